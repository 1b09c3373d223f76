"""Run directories: a lock, atomic files, checkpoints, RNG state, the checkpoint of a training run
and resuming it, and --overwrite that keeps the old run until the new one has started."""
import errno
import fnmatch
import json
import os
import random
import re
import shutil
import tempfile
import time
import types
import zipfile

import numpy as np
import torch
import yaml

from common import dist
from common.cli import UserError, progress

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run directories are not locked
    fcntl = None


# Flags that may differ when the same run is re-launched (where it runs, how it is resumed).
_RELAUNCH_FLAGS = {"device", "overwrite", "config", "out", "compile", "save_every", "save_seconds", "tensorboard"}
# What scripts write into a run directory (a folder without args.yaml is only touched for these).
RUN_FILES = ("args.yaml", "log.jsonl", "checkpoint*.pt", "metrics.json", "predictions.npz", "*.png",
             "saliency.npz", "lr_range*.json")


# ---------------------------------------------------------------- the OS says no
def _os_error(e, what, fix="free space or fix the folder's permissions, then run the same command again"):
    """One line for an OSError: what could not be done, the OS's words, the fix."""
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (the disk or your quota is full)"
    return UserError(f"{what}: {reason}; {fix}")


def _make_dir(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # can we write there at all?
    except OSError as e:
        raise _os_error(e, f"cannot write in --out {out}", "choose a folder you can write to")


# ---------------------------------------------------------------- one process per run directory
_locks = {}


def lock_run_dir(out):
    """Hold an exclusive lock on `out` (the file <out>/.lock, holding our PID) until this process
    ends: a second process on the same run directory is refused, naming the first's PID. The OS
    drops a lock when its process dies, so a killed run's lock does not block the next one."""
    key = os.path.realpath(out)
    if fcntl is None or key in _locks:
        return
    path = os.path.join(out, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _os_error(e, f"cannot create the lock file {path}", "choose a folder you can write to")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{out} is in use by another run (PID {pid}); wait for it to end, stop it, "
                        f"or choose another --out")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _locks[key] = fd


# ---------------------------------------------------------------- --overwrite: moved aside, then dropped
_pending = {}  # out -> the folder its old run was moved to, until the new run has started


def _entries(out):
    return sorted(name for name in os.listdir(out) if not name.startswith("."))


def _move_aside(out, names):
    old = os.path.join(out, f".old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.mkdir(old)
        for name in names:
            os.rename(os.path.join(out, name), os.path.join(old, name))
    except OSError as e:
        raise _os_error(e, f"cannot move the old run in {out} aside for --overwrite")
    _pending[out] = old
    print(f"note: the old run in {out} is kept in {old} until this one has written its first checkpoint")


def restore_overwritten(out, old):
    """Put a run that --overwrite moved into `old` back into `out`, dropping what the new run wrote."""
    for name in _entries(out):
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in os.listdir(old):
        os.rename(os.path.join(old, name), os.path.join(out, name))
    os.rmdir(old)


def commit_overwrite(out):
    """The new run in `out` has started (its first checkpoint is written, or it finished): delete
    the old run that --overwrite moved aside. save_checkpoint and cli.run_main call it."""
    old = _pending.pop(out, None)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def finish_overwrite(ok):
    """At the process's end (cli.run_main): drop the old runs of the runs that started or finished
    (ok), put them back otherwise (bad input, an interrupt, a crash before the first checkpoint)."""
    for out, old in list(_pending.items()):
        if ok:
            commit_overwrite(out)
        else:
            _pending.pop(out)
            try:
                restore_overwritten(out, old)
            except OSError as e:
                print(f"error: the old run is left in {old} ({e.strerror}); move its files back into {out}")


def _restore_leftovers(out):
    """A run killed between --overwrite and its first checkpoint left the old run in .old-*: the
    old run is the one worth keeping, so it goes back (we hold the lock: nobody else is using them)."""
    for name in sorted(os.listdir(out)):
        if name.startswith(".old-") and os.path.join(out, name) not in _pending.values():
            restore_overwritten(out, os.path.join(out, name))
            print(f"note: put back the run in {out} that an interrupted --overwrite had moved aside")


# ---------------------------------------------------------------- run directories
def _read_args(path):
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        saved = e
    if not isinstance(saved, dict):
        raise UserError(f"{path} is unreadable or corrupt, so this run cannot be checked or resumed; "
                        f"pass --overwrite to start afresh, or choose another --out")
    return saved


def prepare_run_dir(out, flags, done_file):
    """Create `out`, lock it for this process and check that it belongs to this command (`flags`: the
    dict of its resolved flags, "overwrite" among them). Returns
    True when the run was started before and is unfinished (the caller resumes); refuses finished
    or foreign runs. With --overwrite the old run is moved aside (put back if this one fails before
    its first checkpoint or its end; see commit_overwrite)."""
    _make_dir(out)
    lock_run_dir(out)
    for name in os.listdir(out):  # left by a run killed while it wrote a file (we hold the lock)
        if name.startswith(".tmp-"):
            os.remove(os.path.join(out, name))
    _restore_leftovers(out)
    progress.update(out=out, overwrite=bool(flags["overwrite"]), checkpoint=None)
    args_path = os.path.join(out, "args.yaml")
    mine = {k: v for k, v in flags.items() if k not in _RELAUNCH_FLAGS}
    ours = [n for n in _entries(out) if any(fnmatch.fnmatch(n, p) for p in RUN_FILES)]
    if os.path.exists(args_path) and not flags["overwrite"]:
        theirs = {k: v for k, v in _read_args(args_path).items() if k not in _RELAUNCH_FLAGS}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{out} holds a run of a different command ({k}: {theirs.get(k)!r} there, "
                            f"{mine.get(k)!r} now); choose another --out or pass --overwrite")
        if done_file and os.path.exists(os.path.join(out, done_file)):
            raise UserError(f"{out} holds a finished run; choose another --out or pass --overwrite to redo it")
        return True
    if ours and not flags["overwrite"]:
        raise UserError(f"{out} holds {ours[0]} but no args.yaml, so it is no run this command can continue; "
                        f"choose another --out or pass --overwrite")
    if ours:
        _move_aside(out, _entries(out) if os.path.exists(args_path) else ours)
    atomic_write_text(args_path, yaml.safe_dump(flags, sort_keys=True))
    return False


def append_jsonl(path, record):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise _os_error(e, f"cannot append to {path}")


def read_log(path):
    """The records of a log.jsonl; a torn last line (a kill while it was written) is dropped, any
    other line that is not JSON is a UserError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f.read().split("\n"), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            if n != lines[-1][0]:  # only the last line can be one a kill cut short
                raise UserError(f"{path} line {n} is not JSON; delete that line, or pass --overwrite to "
                                f"start afresh")
    return records


def cut_log(path, keep):
    """Rewrite a log.jsonl with the records for which keep(record) is true, atomically (also
    drops a torn last line). Returns the records kept."""
    records = read_log(path)
    kept = [r for r in records if keep(r)]
    if os.path.exists(path):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


# ---------------------------------------------------------------- atomic files and checkpoints
def _atomic_replace(path, write, replaced=None):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a torn one. The OS refusing (a full
    disk, no permission) is a UserError, with the old file in place."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file; move it away, or choose another --out")
    folder = os.path.dirname(os.path.abspath(path))
    kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if replaced:
            replaced()
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise _os_error(e, f"cannot write {path} ({kept})")
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode()))


def _cpu(obj):
    """Every tensor in nested dicts / lists / tuples moved to the CPU: a checkpoint then loads
    with a plain torch.load(path, weights_only=True) on a machine without the training device."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _torch_save(state, f):
    """torch.save into the open file f, with the OS's own error when a write fails: torch turns it
    into a RuntimeError without the errno, so the writes go through f.write here."""
    failed = []

    def write(data):
        try:
            return f.write(data)
        except OSError as e:
            failed.append(e)
            raise
    try:
        torch.save(state, types.SimpleNamespace(write=write, flush=f.flush))
    except RuntimeError:
        if failed:
            raise failed[0]
        raise


def save_checkpoint(state, path):
    """Write `state` (tensors moved to the CPU) to `path` atomically; record it as the run's
    checkpoint (cli.progress) and, the new run having started, drop the run --overwrite set aside."""
    position = {k: state[k] for k in ("epoch", "step") if isinstance(state.get(k), int)}
    _atomic_replace(path, lambda f: _torch_save(_cpu(state), f),
                    replaced=lambda: progress.update(checkpoint=path, **position))
    commit_overwrite(os.path.dirname(path))


def load_checkpoint(path):
    """torch.load with weights_only=True: a file carrying arbitrary pickled objects is refused,
    never executed. Every failure is one line naming the file and what is wrong with it."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file; pass the checkpoint.pt inside a run folder")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise _os_error(e, f"cannot read {path}", "check the file's permissions")
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError / EOFError for torn files
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            found = found.group(1) if found else ""
            raise UserError(f"refusing to load {path}: it holds pickled Python objects, not only tensors"
                            + (f" ({found})" if found else "") + "; it was not run. Load only checkpoints "
                            "of MedSSL or torchvision-layout state dicts")
        complete = zipfile.is_zipfile(path)
        raise UserError(f"{path} is truncated or corrupt ({'a damaged' if complete else 'not a complete'} "
                        f"PyTorch file); copy it again, or use another checkpoint")


# ---------------------------------------------------------------- RNG state and resuming a run
def rng_state(aug_generator):
    """Every random stream a run draws from, as tensors and plain values (weights_only-safe): the
    CUDA stream of the training device alone (that of aug_generator's device, none on the CPU)."""
    np_state = np.random.get_state()
    device = aug_generator.device
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "augment": aug_generator.get_state(), "device": device.type,
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def _check_device(state, aug_generator):
    # checkpoints written before "device" was saved: a CPU generator's state is 5056 bytes, CUDA's 16
    saved = state.get("device") or ("cpu" if state["augment"].numel() > 16 else "cuda")
    now = aug_generator.device.type
    if saved != now:
        raise UserError(f"the checkpoint in {progress.out or '--out'} was written by a run on {saved} and this one "
                        f"runs on {now}: their random streams differ, so it cannot be continued exactly; pass "
                        f"--device {saved}, or --overwrite to start afresh")


def set_rng_state(state, aug_generator):
    _check_device(state, aug_generator)
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    aug_generator.set_state(state["augment"])
    device = aug_generator.device
    if state["cuda"] and device.type == "cuda":
        # one state (the training device's); older checkpoints hold every visible GPU's
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(state["cuda"][index if index < len(state["cuda"]) else 0], device)


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
    _check_device(state["rng"], aug_generator)  # before anything is loaded
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"], aug_generator)
    # .get: checkpoints written before mid-epoch resume existed hold epoch ends only
    return {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state.get("step_in_epoch", 0),
            "epoch_start": state["rng"].get("epoch_start"), "losses": state.get("epoch_losses", torch.zeros(0))}


RUN_KEYS = ("epoch", "step", "rng", "meta")


def open_run(out, flags):
    """Set up the run directory `out` (prepare_run_dir, `flags` the run's resolved flags) and return the checkpoint of the unfinished
    run in it, or None for a new run; a finished run is refused. The log is cut back to the
    checkpoint's position (lines of epochs to be redone and a torn last line go). Under torchrun rank 0
    does this and sends the checkpoint to every rank (`out` need only be on rank 0's filesystem)."""
    def on_rank_0():
        resume = prepare_run_dir(out, flags, done_file=None)
        path, log = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")
        if not resume:
            return None
        if not os.path.lexists(path):  # killed before its first checkpoint: it starts again from scratch
            cut_log(log, lambda record: False)
            return None
        state = load_checkpoint(path)
        if not (isinstance(state, dict) and all(k in state for k in RUN_KEYS)
                and isinstance(state["meta"], dict) and state["meta"].get("format") == "medssl"):
            raise UserError(f"{path} is not a checkpoint of a MedSSL training run; move it away to start this "
                            f"run afresh, or pass --overwrite")
        if state["epoch"] >= flags["epochs"]:
            raise UserError(f"{out} holds a finished run; choose another --out or pass --overwrite")
        # an epoch's line is logged before its checkpoint: the lines of epochs to be redone go
        cut_log(log, lambda record: isinstance(record.get("epoch"), int) and record["epoch"] < state["epoch"])
        progress.update(checkpoint=path, epoch=state["epoch"], step=state["step"])
        return state
    return dist.on_main(on_rank_0)
