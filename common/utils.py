"""What every script shares besides data, augment, models and metrics: flag parsing with YAML
configs, one-line user errors, run directories, atomic checkpoints, seeding, schedules."""
import argparse
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
