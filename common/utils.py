"""What every script shares besides data, augment, models and metrics: flag parsing with YAML
configs, one-line user errors, run directories, atomic checkpoints, seeding, schedules."""
import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch
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


# ---------------------------------------------------------------- flags
def add_common_flags(parser, data_help="MedMNIST 2D flag, e.g. pneumoniamnist"):
    """The data / model / run flags every script shares (DESIGN.md); each script adds its own
    optimisation flags next to these so their help can quote its paper."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="pneumoniamnist", help=data_help)
    g.add_argument("--size", type=int, default=28, help="image side: 28, 64, 128 or 224 (MedMNIST+)")
    g.add_argument("--data-root", default=None,
                   help="folder with <flag>[_<size>].npz; default $MEDMNIST_ROOT, else ~/.medmnist")
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
    return args


def steps_per_epoch(n_images, batch_size, max_steps=None):
    """Full batches per epoch (the last partial one is dropped: BN needs full batches), capped by
    --max-steps; refuses a batch larger than the training set."""
    if batch_size > n_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_images} training images; "
                        f"use --batch-size {n_images} or less")
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
_RELAUNCH_FLAGS = {"device", "overwrite", "config", "out", "compile"}


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


LR_SCHEDULES = ("constant", "cosine", "1cycle")


def learning_rate(schedule, step, total_steps, base_lr, warmup_steps=0):
    """The lr at `step` of `total_steps`: constant; cosine decay to 0 after a linear warm-up of
    `warmup_steps` (paper 002 used cosine annealing); or 1cycle peaking at base_lr (paper 003)."""
    if schedule == "constant":
        return base_lr
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
