"""Run directories: atomic files, checkpoints, RNG state, the checkpoint of a training run and
resuming it."""
import json
import os
import random
import tempfile

import numpy as np
import torch
import yaml

from common import dist
from common.cli import UserError


# Flags that may differ when the same run is re-launched (where it runs, how it is resumed).
_RELAUNCH_FLAGS = {"device", "overwrite", "config", "out", "compile", "save_every", "save_seconds", "tensorboard"}


def prepare_run_dir(out, flags, done_file):
    """Create `out` or check that it belongs to this command (`flags`: the dict of its resolved flags,
    "overwrite" among them). Returns True when the run was started before and is unfinished (the caller
    resumes); refuses finished or foreign runs."""
    os.makedirs(out, exist_ok=True)
    args_path = os.path.join(out, "args.yaml")
    mine = {k: v for k, v in flags.items() if k not in _RELAUNCH_FLAGS}
    if os.path.exists(args_path) and not flags["overwrite"]:
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
    atomic_write_text(args_path, yaml.safe_dump(flags, sort_keys=True))
    if flags["overwrite"]:  # start afresh: the old log would mix two runs
        for name in ("log.jsonl", "checkpoint.pt"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    return False


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def open_run(out, flags):
    """Set up the run directory `out` (prepare_run_dir, with `flags` the run's resolved flags, among them
    "overwrite" and "epochs") and return the checkpoint of the unfinished run in it, or None for a new run;
    a finished run is refused. Under torchrun rank 0 does this and sends the checkpoint to every rank
    (`out` need only be on rank 0's filesystem)."""
    def on_rank_0():
        resume = prepare_run_dir(out, flags, done_file=None)
        for name in os.listdir(out):  # left by a run killed while it wrote a file
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out, name))
        path, log = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")
        if not (resume and os.path.exists(path)):
            return None
        state = load_checkpoint(path)
        if state["epoch"] >= flags["epochs"]:
            raise UserError(f"{out} holds a finished run; choose another --out or pass --overwrite")
        if os.path.exists(log):  # epochs logged after the last checkpoint are redone: drop their lines
            with open(log) as f:
                atomic_write_text(log, "".join(line for line in f if json.loads(line)["epoch"] < state["epoch"]))
        return state
    return dist.on_main(on_rank_0)
