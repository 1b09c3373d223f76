"""What every pretraining method shares: its run (data, run directory, resume), its main(),
and the loop.

A method is one file, pretrain_<method>.py: its own flags, its loss, its heads, and `build(args, run)`,
which makes its modules, its optimiser and its step function and hands them back as a `Method`; its
main() is `pretrain.main(...)`. Its parser starts from cli.pretrain_parser (the shared flags, light
enough to parse before torch loads). Everything else is here: the run directory and resume, the epoch's
permutation, mid-epoch resume, checkpoints (every --save-every steps, at epoch ends at most every
--save-seconds), the NaN guard, the kNN monitor, the per-epoch log line, the experiment trackers
(--logger), preemption (SIGUSR1: a checkpoint at a step's end) and rank 0's duties under torchrun.
Bit-exact resume rests on one order of random draws: the permutation first, then whatever the step draws
from the same generator; keeping that order in one place is why there is one loop."""
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils import _pytree
from tqdm import tqdm

from common import augment, cli, data, dist, errors, loggers, models, optim, precision, preemption, rundir
from common.errors import UserError
from common.precision import Precision


# ---------------------------------------------------------------- what a method hands the loop
@dataclass
class Method:
    """What a pretraining method's build(args, run) hands the loop."""
    name: str                        # recorded in the checkpoint's meta ("byol", "barlow", "simclr", ...)
    modules: dict                    # every module the checkpoint saves; "encoder" is the one evaluated later
    optimizer: torch.optim.Optimizer
    # step(batch, step) -> (loss, figures): one optimiser step on a uint8 global batch at optimiser step
    # `step`; loss = the global batch's loss, detached, on the device; figures = plain values (lr, ...)
    step: Callable
    # start_epoch(epoch) -> figures, before each epoch (e.g. freeze or unfreeze a part of the encoder)
    start_epoch: Optional[Callable] = None
    # the method's own persistent state (a queue of negatives, a centre, a found lr): saved in every
    # checkpoint under these names and restored on resume, tensors in place (the step keeps using the
    # same tensor, bit-exactly), plain values by replacing the entry: a step reads them from this dict
    state: dict = field(default_factory=dict)
    summary: str = ""                # said once before training, after the corpus and step counts


@dataclass
class Schedule:
    """The shared lr schedule (--lr-schedule, --lr, --warmup-epochs, --final-lr-fraction) in steps."""
    kind: str = "constant"
    lr: float = 1e-3
    warmup_steps: int = 0
    total_steps: int = 1
    final_fraction: float = 0.0


@dataclass
class Run:
    """A pretraining run: where it reads and writes and how long it goes, set up by `setup` (or
    `in_memory` for benchmarks and tests) before the model is built."""
    device: torch.device
    images: torch.Tensor             # uint8 (N, C, H, W): the corpus, on the device (or in pinned host memory)
    steps_per_epoch: int
    generator: torch.Generator       # the one generator of the permutation and the augmentations
    out: Optional[str] = None
    index: Optional[torch.Tensor] = None  # the corpus indices one epoch visits (a class repeated to oversample it)
    state: Optional[dict] = None     # the checkpoint of the unfinished run in `out`, or None
    monitor_splits: Optional[list] = None  # [train, val] of the first dataset for the kNN monitor, or None
    views: tuple = None              # the augmentation (augment.views of --aug, --crop-scale)
    epochs: int = 1
    batch_size: int = 2
    in_chans: int = 3
    schedule: Schedule = field(default_factory=Schedule)
    precision: Precision = Precision(bf16=False, channels_last=True)  # common/precision.py
    compile: bool = False            # --compile: pretrain.compiled() compiles a method's forward_loss
    sync_bn: bool = False
    save_every: int = 0              # optimiser steps between mid-epoch checkpoints (0: none)
    save_seconds: float = 0.0        # at least this long between epoch-end checkpoints (0: every epoch)
    eval_every: int = 0              # epochs between kNN-monitor evaluations (0: never)
    trackers: tuple = ()             # --logger: the experiment trackers train() logs to (common/loggers.py)
    meta: dict = field(default_factory=dict)   # plain values the checkpoint's "meta" records

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(len(self.images), device=self.images.device)

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch


def steps_per_epoch(n_images, batch_size, max_steps=None):
    """Full batches per epoch (the last partial one is dropped: BN needs full batches), capped by
    --max-steps; refuses a batch larger than the training set."""
    if batch_size > n_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_images} training images; "
                        f"use --batch-size {n_images} or less")
    if batch_size % dist.world_size():
        raise UserError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                        f"{dist.world_size()} torchrun processes")
    steps = n_images // batch_size
    return min(steps, max_steps) if max_steps else steps


def _schedule(flags, n_steps):
    lr = flags["lr"] if flags["lr"] != "auto" else 0.0  # auto: the method sets its own (pretrain_barlow.py)
    return Schedule(flags["lr_schedule"], lr, flags["warmup_epochs"] * n_steps, flags["epochs"] * n_steps,
                    flags["final_lr_fraction"])


def _views(flags):
    try:
        return augment.views(flags["aug"], flags["crop_scale"])
    except ValueError as e:
        raise UserError(f"--aug: {e}")


def setup(script, flags):
    """Check --aug, join torchrun's processes, name the run directory, load the corpus, and open the run:
    everything a pretraining script does before it builds its model. `flags` is the dict of the script's
    resolved flags (plain values; written to args.yaml, with "out" filled in when none was given). Seeds
    every RNG last, so that the model built next draws its initial weights from the seed."""
    views = _views(flags)
    # the encoder's settings, checked before anything is written: a bad --arch / --patch-size is one line
    settings = models.encoder_settings(flags["arch"], flags["size"], flags.get("patch_size"), flags.get("pool"))
    device = dist.init_distributed(cli.pick_device(flags["device"]))
    out = flags["out"] or dist.on_main(cli.default_out, script, flags["data"])
    flags = {**flags, "out": out}
    options = data.options_from(flags)
    source, size, root, in_chans = flags["data"], flags["size"], flags["data_root"], flags["in_chans"]
    monitor = None
    if flags["eval_every"] and dist.is_main():
        monitor = data.monitor_splits(source, size, root, device, in_chans, options)
    if monitor and "," not in source:  # the corpus is the monitor's train split: one copy, not two
        images = monitor[0].images
    else:
        images = data.load_pretrain_images(source, size, root, device, in_chans, options)
    note = augment.size_note(views, images.shape[-2])  # e.g. a blur too narrow to act at this size
    if note:
        print(f"note: --aug {flags['aug']}: {note}", flush=True)
    n_steps = steps_per_epoch(len(images), flags["batch_size"], flags["max_steps"])
    # what the run is made from (provenance.json): a resume on other data, --init weights or torchrun processes
    # is refused (rundir.check_inputs); the descriptions are memoised, so this lists nothing again
    inputs = rundir.provenance({s.strip(): data.describe(s, size, root, options).hash for s in source.split(",")},
                               encoder=flags.get("init"), world_size=dist.world_size())
    state = rundir.open_run(out, flags, inputs)
    chosen = run_precision(flags["precision"], device, images.shape[-1], state,
                           convolutional=not models.vit_arch(flags["arch"]))
    why = "as the checkpoint was trained" if state else f"--precision {flags['precision']}"
    print(f"precision: {chosen.describe()} ({why})", flush=True)
    cli.seed_everything(flags["seed"])
    generator = torch.Generator(device).manual_seed(flags["seed"])
    meta = {"arch": flags["arch"], "stem": flags["stem"], "in_chans": in_chans, "size": size, **settings,
            "args": flags, **chosen.record()}
    return Run(device=device, images=images, steps_per_epoch=n_steps, generator=generator, out=out, state=state,
               monitor_splits=monitor, views=views, epochs=flags["epochs"], batch_size=flags["batch_size"],
               in_chans=in_chans, schedule=_schedule(flags, n_steps), precision=chosen, compile=flags["compile"],
               sync_bn=flags["sync_bn"], save_every=flags["save_every"], save_seconds=flags["save_seconds"],
               eval_every=flags["eval_every"],
               trackers=tuple(loggers.chosen(flags.get("logger"), flags.get("tensorboard"))), meta=meta)


def run_precision(requested, device, side, state=None, convolutional=True):
    """The run's Precision (common/precision.py): that of the checkpoint of a resumed run, which it keeps; a
    checkpoint without a recorded precision ran bf16 on CUDA and float32 elsewhere, channels_last.
    convolutional=False: a ViT (precision.resolve)."""
    if state is None:
        return precision.resolve(requested, device, side, convolutional=convolutional)
    meta = state.get("meta", {})
    if "precision" not in meta:
        return Precision(bf16=torch.device(device).type == "cuda", channels_last=True)
    return precision.resolve(requested, device, side, recorded=meta)


def in_memory(flags, images, device, steps=None):
    """A Run over `images` (uint8, on `device`) with no run directory, for benchmarks and tests that
    call a method's build(args, run) and step directly: the generator seeded from flags["seed"], the
    schedule of `steps` steps per epoch (default: the images' full batches)."""
    device = torch.device(device)
    n_steps = steps or len(images) // flags["batch_size"]
    return Run(device=device, images=images, steps_per_epoch=n_steps,
               generator=torch.Generator(device).manual_seed(flags["seed"]), views=_views(flags),
               epochs=flags["epochs"], batch_size=flags["batch_size"], in_chans=flags["in_chans"],
               schedule=_schedule(flags, n_steps), compile=flags.get("compile", False),
               precision=precision.resolve(flags.get("precision", "auto"), device, images.shape[-1],
                                           convolutional=not models.vit_arch(flags.get("arch") or "resnet18")))


def main(script, get_args_parser, build, check=None, lr_auto=False):
    """A pretraining script's main: parse the flags, `check(args)` (a method's own refusals, before anything
    is written), set up the run (`setup`), `build(args, run)` the method, train it. `lr_auto`: the
    method finds --lr auto itself (an LR range test); the others refuse it. Bad input is a UserError,
    which cli.run_main, the script's entry, prints as one line."""
    args = cli.parse_args(get_args_parser())
    if args.lr == "auto" and not lr_auto:
        raise UserError(f"--lr auto (an LR range test) is pretrain_barlow.py's; give {script}.py a number")
    if check:
        check(args)
    run = setup(script, vars(args))
    args.out = run.out
    method = build(args, run)
    params = sum(p.numel() for g in method.optimizer.param_groups for p in g["params"] if p.requires_grad)
    print(f"{len(run.index)} images per epoch, {run.steps_per_epoch} steps/epoch, {params / 1e6:.1f}M "
          f"trainable parameters" + (f", {dist.world_size()} processes" if dist.world_size() > 1 else "")
          + (f", {method.summary}" if method.summary else ""))
    train(method, run)


# ---------------------------------------------------------------- pieces of a method's step
def two_views(batch, run, generator=None):
    """Two augmented views of a uint8 global batch as this rank's input tensors (in the run's memory layout), drawn from
    the run's generator (or `generator`). Every rank augments the whole global batch and keeps its own
    rows: an image's views do not depend on the number of processes, and the generator stays in step on
    every rank."""
    return tuple(as_input(v, run) for v in augment.two_views(batch, run.views, generator or run.generator))


def as_input(views, run):
    """A uint8 global batch of views as this rank's rows of input tensors, in the run's memory layout."""
    return data.to_input(dist.my_rows(views), run.in_chans).contiguous(memory_format=run.precision.memory_format)


def set_lr(optimizer, run, step):
    """Set this step's lr from the run's schedule (times a group's lr_scale); returns it."""
    s = run.schedule
    return optim.schedule_step(optimizer, s.kind, step, s.total_steps, s.lr, s.warmup_steps, s.final_fraction)


def optimizer_step(optimizer, loss):
    """Backward of `loss` and one step of `optimizer`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def place(modules, run):
    """Every module on the run's device in the run's memory layout (run.precision: channels_last where it
    makes convolutions faster, tiny convolutions as matrix products where that is); with --sync-bn,
    BatchNorm over the global batch under torchrun (dist.sync_batchnorm)."""
    for module in modules.values():
        run.precision.prepare(module, run.device, run.in_chans, run.images.shape[-1])
        if run.sync_bn:
            dist.sync_batchnorm(module)


def compiled(forward_loss, run):
    """`forward_loss` under --compile, else itself: a method's forward of both views through its networks
    and its loss, the augmentation's random draws left outside; backward runs the graph AOTAutograd
    compiles with it, the optimiser step stays eager. One process on CUDA: mode "reduce-overhead" (the
    step replays as CUDA graphs); the CPU, and torchrun (DDP's gradient hooks run between the graph's
    pieces): the default mode. The same shapes every step (full batches) compile once. It may return any
    nesting of tensors (a loss, or a loss and a queue's new keys); each is a copy, since a CUDA graph's
    outputs are overwritten by its next replay."""
    if not run.compile:
        return forward_loss
    graphs = run.device.type == "cuda" and dist.world_size() == 1
    compiled_fn = torch.compile(forward_loss, mode="reduce-overhead" if graphs else None)

    def call(*args):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return _pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, compiled_fn(*args))
    return call


def mean_finite_loss(losses, step, epoch, out):
    """Mean of an epoch's per-step losses (tensors, kept on the device so the loop never syncs);
    a non-finite one stops the run naming its step, before the epoch's checkpoint is written."""
    losses = torch.stack(losses)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = step - len(losses) + int(bad[0])
        if errors.progress.checkpoint:
            advice = (f"the last good checkpoint in {out} is kept; lower --lr or check the data, then start again "
                      f"with --overwrite or another --out")
        else:
            advice = "no checkpoint was written; lower --lr or check the data"
        raise UserError(f"loss became {losses[bad[0]].item()} at step {first} (epoch {epoch}); {advice}")
    return losses.mean().item()


def save_run(path, objects, aug_generator, **state):
    """Check that every rank holds the same weights (ranks_agree), then write rundir.run_state(objects,
    aug_generator, **state) to `path` atomically, from rank 0 alone. Every rank calls it. A non-finite
    loss among the epoch's so far stops the run instead: a checkpoint is always a good one."""
    if state.get("losses"):
        mean_finite_loss(state["losses"], state["step"], state["epoch"], os.path.dirname(path))
    digests = dist.ranks_agree({k: v for k, v in objects.items() if isinstance(v, torch.nn.Module)})
    if dist.is_main():
        rundir.save_checkpoint(rundir.run_state(objects, aug_generator, **state, rank_digests=digests), path)


def start_epoch(n, generator, resume=None):
    """An epoch's start: its order of the n items, a permutation drawn from `generator`, the state it
    was drawn from (a mid-epoch checkpoint keeps it), its first step and the losses so far. Resuming
    mid-epoch (`resume`: restore_run's position, step_in_epoch > 0), the same permutation is drawn again
    from the saved state, on a copy so that `generator` stays where the checkpoint left it, and the
    steps done are skipped."""
    if resume and resume["step_in_epoch"]:
        saved = torch.Generator(generator.device).set_state(resume["epoch_start"])
        order = torch.randperm(n, generator=saved, device=generator.device)
        return order, resume["epoch_start"], resume["step_in_epoch"], list(resume["losses"].to(generator.device))
    epoch_start = generator.get_state()
    return torch.randperm(n, generator=generator, device=generator.device), epoch_start, 0, []


def duration(seconds):
    """12 s, 4 min 05 s, 3 h 07 min: for the time-left column."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def epoch_line(stats, epochs, seconds_left):
    """One readable line per epoch: `epoch 3/100  loss 1.2345  lr 1.00e-04 ... 512 img/s  3 min 05 s left`."""
    parts = [f"epoch {stats['epoch'] + 1}/{epochs}"]
    for key, value in stats.items():
        if key in ("epoch", "images_per_sec"):
            continue
        if isinstance(value, float):
            value = f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
        parts.append(f"{key} {value}")
    parts.append(f"{stats['images_per_sec']:.0f} img/s")
    parts.append(f"{duration(seconds_left)} left")
    return "  ".join(parts)


def plot_log(out, method):
    """loss.pdf / .png (and knn_val_auc.pdf / .png when the monitor is on) from the run's log.jsonl,
    titled with the method and the data (args.yaml)."""
    import json
    import yaml
    from common import figures
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    try:
        with open(os.path.join(out, "args.yaml")) as f:
            args = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        args = {}
    name = figures.method_name(method)
    data = f" on {figures.dataset_name(args['data'])}" + (f" {args['size']} px" if args.get("size") else "") \
        if args.get("data") else ""
    epochs = [r["epoch"] + 1 for r in records]
    figures.plot_training_curves({name: (epochs, [r["loss"] for r in records])}, os.path.join(out, "loss.png"),
                                 title=f"{name} pretraining loss{data}", ylabel=f"Training loss ({name})")
    monitored = [(r["epoch"] + 1, r["knn_val_auc"]) for r in records if "knn_val_auc" in r]
    if monitored:
        figures.plot_training_curves({name: tuple(zip(*monitored))}, os.path.join(out, "knn_val_auc.png"),
                                     title=f"kNN monitor of the {name} encoder{data}: validation split",
                                     ylabel=figures.axis_label("knn_val_auc"))


def restore_state(state, saved):
    """Put a method's persistent state back from a checkpoint `saved`: each tensor of `state` is
    overwritten in place (whoever holds it sees the saved values), a plain value is replaced."""
    for name, value in state.items():
        if name not in saved:
            raise UserError(f"the checkpoint has no {name!r}, which this method keeps: it was written by another "
                            f"method or MedSSL version; start again with another --out")
        if isinstance(value, torch.Tensor):
            if saved[name].shape != value.shape:
                raise UserError(f"the checkpoint's {name} has shape {tuple(saved[name].shape)}, this run's "
                                f"{tuple(value.shape)}: it was written with other flags; start again with another --out")
            value.copy_(saved[name])
        else:
            state[name] = saved[name]


def train(method, run, log_every=10):
    """Train `method` from where `run.state` left it (or from the start) to run.epochs epochs of
    run.steps_per_epoch steps of run.batch_size images. Writes log.jsonl (one JSON line per epoch) and
    checkpoint.pt (overwritten atomically every run.save_every steps inside an epoch, and at an epoch's end
    when run.save_seconds have passed since the last one, always after the last epoch) into run.out; every
    run.eval_every epochs logs the kNN AUC of the encoder on the validation split. Returns the checkpoint's
    path."""
    epochs, batch_size = run.epochs, run.batch_size
    objects = {**method.modules, "optimizer": method.optimizer}
    clash = set(method.state) & (set(objects) | set(rundir.run_state_keys()))
    if clash:
        raise ValueError(f"Method.state names {sorted(clash)} are taken by the checkpoint's own entries")
    position = rundir.restore_run(run.state, objects, run.generator)
    if run.state:
        restore_state(method.state, run.state)
        print(f"resuming {run.out} at epoch {position['epoch']}, step {position['step_in_epoch']} of it")
    checkpoint = os.path.join(run.out, "checkpoint.pt")
    meta = {"format": "medssl", "format_version": models.FORMAT_VERSION, "method": method.name,
            "modules": list(method.modules), "input_scaling": models.INPUT_SCALING, **run.meta}

    def save(**where):
        save_run(checkpoint, objects, run.generator, meta=meta, **method.state, **where)

    trackers = loggers.open_trackers(run.trackers, run.out, run.meta.get("args", {})) if dist.is_main() else []
    preemption.defer()  # SIGUSR1 (SIGTERM under SLURM) from here on: a checkpoint at the end of the step
    step, last_save, started = position["step"], time.time(), time.time()
    step_figures = {}
    first_epoch = position["epoch"]
    for epoch in range(first_epoch, epochs):
        figures = method.start_epoch(epoch) if method.start_epoch else {}
        errors.progress.update(epoch=epoch, step=step)
        order, epoch_start, first, losses = start_epoch(len(run.index), run.generator,
                                                        position if epoch == first_epoch else None)
        order = run.index[order]
        start = time.time()
        bar = tqdm(range(first, run.steps_per_epoch), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not dist.is_main())
        for i in bar:
            batch = data.batch(run.images, order[i * batch_size:(i + 1) * batch_size], run.device)
            loss, step_figures = method.step(batch, step)
            losses.append(loss)
            step += 1
            errors.progress.update(step=step)
            if i % log_every == 0:  # the only host sync inside an epoch
                value = loss.item()
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{step_figures.get('lr', 0):.2e}")
                loggers.log(trackers, {"step/loss": value, **{f"step/{k}": f for k, f in step_figures.items()}},
                            step)
            # under torchrun the ranks agree on the signal at log steps, where the host syncs anyway
            stopping = (dist.world_size() == 1 or i % log_every == 0) and preemption.requested(run.device)
            if (stopping or run.save_every and step % run.save_every == 0) and i + 1 < run.steps_per_epoch:
                save(epoch=epoch, step=step, step_in_epoch=i + 1, epoch_start=epoch_start, losses=losses)
                last_save = time.time()
                if stopping:
                    loggers.close(trackers, preempted=True)
                    preemption.stop()
        seconds = time.time() - start
        stats = {"epoch": epoch, "loss": mean_finite_loss(losses, step, epoch, run.out), **step_figures, **figures,
                 "images_per_sec": round((run.steps_per_epoch - first) * batch_size / seconds, 1)}
        if run.eval_every and (epoch + 1) % run.eval_every == 0 and run.monitor_splits:
            stats["knn_val_auc"] = round(models.knn_val_auc(method.modules["encoder"], *run.monitor_splits,
                                                            run.in_chans, precision=run.precision), 4)
        if dist.is_main():
            rundir.append_jsonl(os.path.join(run.out, "log.jsonl"), stats)
            loggers.log(trackers, {f"epoch/{k}": v for k, v in stats.items() if k != "epoch"}, epoch, axis="epoch")
            loggers.flush(trackers)
        stopping = preemption.requested(run.device) and epoch + 1 < epochs  # the last epoch just ends the run
        if epoch + 1 == epochs or stopping or time.time() - last_save >= run.save_seconds:
            save(epoch=epoch + 1, step=step)
            if dist.is_main():  # the plots follow the checkpoint (matplotlib costs ~0.2 s)
                plot_log(run.out, method.name)
            last_save = time.time()
        left = (time.time() - started) / (epoch + 1 - first_epoch) * (epochs - epoch - 1)
        print(epoch_line(stats, epochs, left), flush=True)
        if stopping:
            loggers.close(trackers, preempted=True)
            preemption.stop()
    loggers.close(trackers)
    print(f"done: {checkpoint}")
    return checkpoint
