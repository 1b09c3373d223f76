"""What every script shares besides data, augment, models and metrics: flag parsing with YAML
configs, one-line user errors, run directories, atomic checkpoints and the checkpoint of a training
run, seeding, schedules, and the torchrun (DistributedDataParallel) helpers."""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # collectives that autograd differentiates
import yaml


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""


def run_main(main):
    """Call main(); turn a UserError into `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- flags
def add_common_flags(parser, data_help="MedMNIST 2D flag, e.g. pneumoniamnist", resnet=True):
    """The data / model / run flags every script shares (DESIGN.md); each script adds its own
    optimisation flags next to these so their help can quote its paper. resnet=False leaves out
    --arch / --stem / --in-chans (finetune_beit.py's model is named by --model)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="pneumoniamnist", help=data_help)
    g.add_argument("--size", type=int, default=28, help="image side: 28, 64, 128 or 224 (MedMNIST+)")
    g.add_argument("--data-root", default=None,
                   help="folder with <flag>[_<size>].npz; default $MEDMNIST_ROOT, else ~/.medmnist")
    if resnet:
        g = parser.add_argument_group("model")
        g.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="backbone (default resnet18)")
        g.add_argument("--stem", default=None, choices=["imagenet", "small"],
                       help="imagenet = torchvision's 7x7/2 conv + max-pool (paper 001, default); "
                            "small = 3x3/1 conv, no max-pool (MedMNIST 28 px benchmark)")
        g.add_argument("--in-chans", type=int, default=None, choices=[1, 3],
                       help="input channels (default 3: gray images are repeated; 1 keeps them gray)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (init, batches, augmentation)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--out", default=None, help="run directory (default runs/<script>-<data>-<time>)")
    g.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch, for smoke runs")
    g.add_argument("--config", default=None, help="YAML file of flag values; flags given on the command line win")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    return parser


def add_resume_and_ddp_flags(parser):
    """The flags of the pretraining scripts for mid-epoch checkpoints and torchrun runs."""
    g = parser.add_argument_group("checkpoints and torchrun")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimiser steps inside an epoch (default 0: at epoch ends only): "
                        "a run killed mid-epoch then loses at most N steps, and the same command continues it "
                        "bit-exactly; every checkpoint rewrites the whole file (180 MB for BYOL with ResNet-18), "
                        "so pick N worth minutes of work")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm normalises with the statistics of the global batch, as one "
                        "process does (the papers trained on one GPU), instead of each rank's rows "
                        "(torch.nn.SyncBatchNorm on CUDA, an equivalent on the CPU); no effect in one process")
    return parser


def parse_args(parser, argv=None):
    """Parse flags, with --config YAML values as defaults, then validate the shared ones."""
    argv = sys.argv[1:] if argv is None else argv
    first, _ = parser.parse_known_args(argv)
    if first.config:
        try:
            with open(first.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config {first.config}: {e}".replace("\n", " "))
        if not isinstance(values, dict):
            raise UserError(f"config {first.config} must be a mapping of flag: value")
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config {first.config} has unknown keys {unknown}; "
                            f"valid keys are the script's flags (see --help)")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "lr"):
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {args.max_steps}")
    if getattr(args, "save_every", 0) < 0:
        raise UserError(f"--save-every must be 0 (epoch ends only) or positive, got {args.save_every}")
    return args


def steps_per_epoch(n_images, batch_size, max_steps=None):
    """Full batches per epoch (the last partial one is dropped: BN needs full batches), capped by
    --max-steps; refuses a batch larger than the training set."""
    if batch_size > n_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_images} training images; "
                        f"use --batch-size {n_images} or less")
    if batch_size % world_size():
        raise UserError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                        f"{world_size()} torchrun processes")
    steps = n_images // batch_size
    return min(steps, max_steps) if max_steps else steps


def mean_finite_loss(losses, step, epoch, out):
    """Mean of an epoch's per-step losses (tensors, kept on the device so the loop never syncs);
    a non-finite one stops the run naming its step, before the epoch's checkpoint is written."""
    losses = torch.stack(losses)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = step - len(losses) + int(bad[0])
        raise UserError(f"loss became {losses[bad[0]].item()} at step {first} (epoch {epoch}); the last good "
                        f"checkpoint in {out} is kept; lower --lr or check the data")
    return losses.mean().item()


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- run directories
# Flags that may differ when the same run is re-launched (where it runs, how it is resumed).
_RELAUNCH_FLAGS = {"device", "overwrite", "config", "out", "compile", "save_every"}


def prepare_run_dir(out, args, done_file):
    """Create `out` or check that it belongs to this command. Returns True when the run was
    started before and is unfinished (the caller resumes); refuses finished or foreign runs."""
    os.makedirs(out, exist_ok=True)
    args_path = os.path.join(out, "args.yaml")
    mine = {k: v for k, v in vars(args).items() if k not in _RELAUNCH_FLAGS}
    if os.path.exists(args_path) and not args.overwrite:
        with open(args_path) as f:
            theirs = {k: v for k, v in (yaml.safe_load(f) or {}).items() if k not in _RELAUNCH_FLAGS}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{out} holds a run of a different command ({k}: {theirs.get(k)!r} there, "
                            f"{mine.get(k)!r} now); choose another --out or pass --overwrite")
        if done_file and os.path.exists(os.path.join(out, done_file)):
            raise UserError(f"{out} holds a finished run; choose another --out or pass --overwrite to redo it")
        return True
    atomic_write_text(args_path, yaml.safe_dump(vars(args), sort_keys=True))
    if args.overwrite:  # start afresh: the old log would mix two runs
        for name in ("log.jsonl", "checkpoint.pt"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    return False


def default_out(script, data):
    import time
    return os.path.join("runs", f"{script}-{data.replace(',', '+')}-{time.strftime('%Y%m%d-%H%M%S')}")


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- atomic files and checkpoints
def _atomic_replace(path, write):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode()))


def save_checkpoint(state, path):
    _atomic_replace(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """torch.load with weights_only=True: a file carrying arbitrary pickled objects is refused,
    never executed."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for torn files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: not a plain-tensor checkpoint ({first[:160]})")


def rng_state(aug_generator):
    """Every random stream a run draws from, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "augment": aug_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state, aug_generator):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    aug_generator.set_state(state["augment"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the checkpoint of a training run
def run_state(objects, aug_generator, epoch, step, step_in_epoch=0, epoch_start=None, losses=(), **extra):
    """Everything a run needs to go on exactly where it stopped: the state dict of every named module
    and optimiser in `objects`; its position: `epoch` epochs and `step` optimiser steps done, of them
    `step_in_epoch` in the unfinished epoch `epoch` (0 at an epoch's end), with that epoch's `losses` so
    far and `epoch_start`, the augmentation generator's state its permutation was drawn from; every RNG
    state; and plain `extra` values (meta, lr)."""
    return {**{name: obj.state_dict() for name, obj in objects.items()},
            "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch,
            "epoch_losses": torch.stack(list(losses)).cpu() if len(losses) else torch.zeros(0),
            "rng": {**rng_state(aug_generator), "epoch_start": epoch_start}, **extra}


def restore_run(state, objects, aug_generator):
    """Load a run_state dict back into the named modules, optimisers and the generators; returns its
    position, the keyword arguments run_state took, for start_epoch. No state: a new run's position."""
    if state is None:
        return {"epoch": 0, "step": 0, "step_in_epoch": 0}
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"], aug_generator)
    # .get: checkpoints written before mid-epoch resume existed hold epoch ends only
    return {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state.get("step_in_epoch", 0),
            "epoch_start": state["rng"].get("epoch_start"), "losses": state.get("epoch_losses", torch.zeros(0))}


def save_run(path, objects, aug_generator, **state):
    """Check that every rank holds the same weights (ranks_agree), then write run_state(objects,
    aug_generator, **state) to `path` atomically, from rank 0 alone. Every rank calls it. A non-finite
    loss among the epoch's so far stops the run instead: a checkpoint is always a good one."""
    if state.get("losses"):
        mean_finite_loss(state["losses"], state["step"], state["epoch"], os.path.dirname(path))
    digests = ranks_agree({k: v for k, v in objects.items() if isinstance(v, torch.nn.Module)})
    if is_main():
        save_checkpoint(run_state(objects, aug_generator, **state, rank_digests=digests), path)


def open_run(args):
    """Set up the run directory args.out (prepare_run_dir) and return the checkpoint of the unfinished
    run in it, or None for a new run; a finished run is refused. Under torchrun rank 0 does this and
    sends the checkpoint to every rank (args.out need only be on rank 0's filesystem)."""
    def on_rank_0():
        resume = prepare_run_dir(args.out, args, done_file=None)
        for name in os.listdir(args.out):  # left by a run killed while it wrote a file
            if name.startswith(".tmp-"):
                os.remove(os.path.join(args.out, name))
        path, log = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "log.jsonl")
        if not (resume and os.path.exists(path)):
            return None
        state = load_checkpoint(path)
        if state["epoch"] >= args.epochs:
            raise UserError(f"{args.out} holds a finished run; choose another --out or pass --overwrite")
        if os.path.exists(log):  # an epoch's line is logged before its checkpoint: drop one to be redone
            with open(log) as f:
                atomic_write_text(log, "".join(line for line in f if json.loads(line)["epoch"] < state["epoch"]))
        return state
    return on_main(on_rank_0)


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


# ---------------------------------------------------------------- schedules
def cosine(step, total_steps, start, end):
    """Cosine interpolation from `start` at step 0 to `end` at `total_steps` (Loshchilov & Hutter;
    BYOL's EMA schedule, Grill et al. 2020 §3.2, uses the same curve from tau_base to 1)."""
    t = min(step, total_steps) / max(total_steps, 1)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def _cos_interp(t, start, end):
    """Cosine interpolation from `start` (t = 0) to `end` (t = 1)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def one_cycle(step, total_steps, max_lr, pct_start=0.25, div=25.0, div_final=1e5):
    """The 1cycle policy (Smith 2018) as fastai's fit_one_cycle runs it, paper 003's schedule
    (§3.4, §3.7, App. A.1): cosine warm-up from max_lr / div to max_lr over the first pct_start of
    training, then cosine annealing down to max_lr / div_final (fastai's defaults)."""
    peak = pct_start * total_steps
    if step < peak:
        return _cos_interp(step / peak, max_lr / div, max_lr)
    return _cos_interp((step - peak) / max(total_steps - peak, 1), max_lr, max_lr / div_final)


def one_cycle_momentum(step, total_steps, pct_start=0.25, moms=(0.95, 0.85, 0.95)):
    """1cycle's momentum, the mirror image of its lr: down from moms[0] to moms[1] while the lr
    rises, back up to moms[2] while it falls (fastai's defaults; paper 003 App. A.1)."""
    peak = pct_start * total_steps
    if step < peak:
        return _cos_interp(step / peak, moms[0], moms[1])
    return _cos_interp((step - peak) / max(total_steps - peak, 1), moms[1], moms[2])


LR_SCHEDULES = ("constant", "cosine", "1cycle", "step", "linear")


def learning_rate(schedule, step, total_steps, base_lr, warmup_steps=0):
    """The lr at `step` of `total_steps`: constant; cosine decay to 0 after a linear warm-up of
    `warmup_steps` (paper 002 used cosine annealing); 1cycle peaking at base_lr (paper 003); or step:
    x0.1 at 50% and 75% of training (MedMNIST v2: epochs 50 and 75 of 100); or linear decay to 0
    (the Hugging Face Trainer's default)."""
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - step / total_steps)
    if schedule == "step":
        return base_lr * 0.1 ** ((step >= total_steps // 2) + (step >= total_steps * 3 // 4))
    if schedule == "1cycle":
        return one_cycle(step, total_steps, base_lr)
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, base_lr, 0.0)


def schedule_step(optimizer, schedule, step, total_steps, base_lr, warmup_steps=0):
    """Set every parameter group's lr for this step; 1cycle also cycles the momentum inversely
    (Adam's beta1, SGD's / LARS' momentum), as fastai does. Returns the lr."""
    lr = learning_rate(schedule, step, total_steps, base_lr, warmup_steps)
    momentum = one_cycle_momentum(step, total_steps) if schedule == "1cycle" else None
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None and "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif momentum is not None and "momentum" in group:
            group["momentum"] = momentum
    return lr


def lr_or_auto(text):
    """argparse type of --lr: a number, or "auto" for an LR range test."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}")


# ---------------------------------------------------------------- optimiser and LR range test
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), Barlow Twins'
    optimiser (Zbontar et al. 2021 §4: lr 0.2 for weights and 0.0048 for biases and BN at batch
    2048, weight decay 1.5e-6). The update of each weight matrix or kernel is
    (grad + wd * w) scaled by eta * ||w|| / ||grad + wd * w||; 1-D parameters (biases, BN) get
    neither weight decay nor the scaling, as in Barlow Twins."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def lr_valley(lrs, losses):
    """The lr half-way along the longest descending stretch of the loss curve (the longest strictly
    decreasing subsequence; fastai's "valley" idea): past the flat start, short of the minimum
    where the loss is about to blow up; paper 003 App. A.1 picks the lr "somewhere in between a
    sharp valley and the minimum". Always one of `lrs`."""
    n = len(losses)
    length, first = [1] * n, list(range(n))   # longest decreasing run ending at i, and where it starts
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], first[i] = length[j] + 1, first[j]
    end = max(range(n), key=lambda i: length[i])
    return lrs[first[end] + (end - first[end]) // 2]


def lr_range_test(batch_loss, optimizer, modules, start_lr=1e-7, end_lr=10.0, steps=100,
                  smoothing=0.98, diverge=4.0):
    """Leslie Smith's LR range test (fastai's lr_find; paper 003 §3.4, App. A.1): one optimiser step
    per lr of an exponential sweep from start_lr to end_lr, recording the loss (an exponential
    moving average, bias-corrected), stopping once it exceeds `diverge` x its minimum or is not
    finite. `batch_loss()` returns a fresh batch's loss; `optimizer` is a throwaway one over the
    parameters to train; the state of `modules` is restored afterwards, so the test leaves no
    trace. Returns (lrs, losses, the lr_valley pick)."""
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    lrs, losses = [], []
    average, best = 0.0, math.inf
    try:
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = batch_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        for m, state in zip(modules, saved):
            m.load_state_dict(state)
        optimizer.zero_grad(set_to_none=True)
    if len(lrs) < 3:
        raise UserError(f"the LR range test diverged within {len(lrs)} steps of {start_lr:g}; "
                        f"start it lower (--lr-range START END STEPS) or give --lr")
    return lrs, losses, lr_valley(lrs, losses)


# ---------------------------------------------------------------- torchrun / DistributedDataParallel
# `torchrun --nproc_per_node=N script.py ...` starts N processes (ranks) with RANK, WORLD_SIZE and
# LOCAL_RANK set. All ranks draw the same permutation and augmentations from the same seed; each trains
# on its rows of every global batch; DDP averages the gradients; rank 0 alone writes files. A plain
# `python script.py` run has no process group, and every helper below then leaves things as they are.
def init_distributed(device):
    """Join torchrun's process group when torchrun started this process: gloo on the CPU, nccl on
    CUDA with one GPU per local rank. Returns the device to train on."""
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for all (errors still reach stderr)
    return device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def on_main(fn, *args):
    """fn(*args) run by rank 0 alone, its result sent to every rank (rank 0 owns the run directory); a
    UserError it raises is raised on every rank, so that all stop with that one line."""
    if world_size() == 1:
        return fn(*args)
    result = [None]
    if is_main():
        try:
            result = [fn(*args)]
        except UserError as e:
            result = [e]
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], UserError):
        raise result[0]
    return result[0]


def my_rows(batch):
    """This rank's rows of a global batch: the whole batch in a single process."""
    n = len(batch) // world_size()
    return batch[rank() * n:(rank() + 1) * n]


def all_rows(x):
    """The global batch, gathered from every rank's rows of it (the inverse of my_rows); gradients flow
    back to each rank's own rows. For a loss over the whole batch, such as Barlow Twins'."""
    return funcol.all_gather_single(x, 0, dist.group.WORLD) if world_size() > 1 else x


def mean_over_ranks(x):
    """The mean of a tensor over the ranks (of the step's loss: rank 0 then logs the global batch's)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def distributed(module, device):
    """`module` in DistributedDataParallel under torchrun (gradients averaged over the ranks), as it is
    otherwise. DDP syncs the gradients of the parameters that require them when it is built."""
    if world_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def state_digest(state_dicts):
    """SHA-256 of the names and bytes of every tensor in some state dicts."""
    digest = hashlib.sha256()
    for state in state_dicts:
        for name, tensor in state.items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ranks_agree(modules):
    """Before rank 0 saves for every rank: give every rank rank 0's buffers (without --sync-bn a rank's
    BatchNorm running statistics follow its own rows; DDP copies rank 0's at each forward anyway), then
    check that all ranks hold the same modules. Returns the ranks' state digests, in rank order; None in
    a single process."""
    if world_size() == 1:
        return None
    for module in modules.values():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    digests = [None] * world_size()
    dist.all_gather_object(digests, state_digest([m.state_dict() for m in modules.values()]))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks' weights differ (state digests {digests}); rank 0 cannot save for all")
    return digests


def sync_batchnorm(module):
    """--sync-bn: every BatchNorm layer of `module` normalises with the statistics of the global batch
    (all ranks' rows), as a single process does. On CUDA torch.nn.SyncBatchNorm does it; torch 2.14's
    refuses CPU tensors, so on the CPU each layer becomes a CPUSyncBatchNorm, keeping its parameters and
    buffers. Returns the module (changed in place)."""
    if any(p.is_cuda for p in module.parameters()):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.__class__ = CPUSyncBatchNorm
    return module


def _sum_over_ranks(x):
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d that, in training mode under torchrun, normalises with the mean and biased
    variance of the global batch: per-channel sums all-reduced over the ranks, which autograd
    differentiates (as SyncBatchNorm's gradient does). Otherwise it is plain BatchNorm."""

    def _check_input_dim(self, x):  # stands in for BatchNorm1d and BatchNorm2d alike
        pass

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * world_size()
        mean = _sum_over_ranks(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _sum_over_ranks(centred.pow(2).sum(dims)) / n  # a second pass: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm keeps it
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
