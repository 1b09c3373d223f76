"""Run directories: a lock, atomic files, checkpoints, RNG state, the checkpoint of a training run
and resuming it, and --overwrite, which removes only a run's own files (RUN_FILES), keeps the old run
until the new one has started, and leaves either of them whole after a kill at any point."""
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import types
import zipfile

import numpy as np
import torch
import yaml

from common import dist
from common.errors import UserError, progress

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run directories are not locked
    fcntl = None


# Flags that may differ when the same run is re-launched (where it runs, how it is resumed).
_RELAUNCH_FLAGS = {"device", "overwrite", "config", "out", "compile", "save_every", "save_seconds", "tensorboard",
                   "logger"}


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


# ---------------------------------------------------------------- what a run writes
# --overwrite removes what a MedSSL run wrote and nothing else, known by name: the exact names below
# (numbered per seed at most, no wildcard that a user's own file could match), in a folder whose
# args.yaml (which a run writes first, atomically) says a run owns it. A record of the run's files
# kept beside them would need every writer to report to it (this module, but also NumPy, matplotlib
# and TensorBoard write here), and a kill between a write and its entry would leave it out of step
# with the folder; the names cannot drift. Anything else (a user's file, a data set's images, a
# folder, a run nested inside) is never moved or removed: --overwrite refuses a folder holding it.
RUN_FILES = (r"args\.yaml", r"log\.jsonl", r"metrics\.json", r"predictions\.npz", r"saliency\.npz",
             r"checkpoint(_seed\d+)?\.pt", r"seed_\d+\.json", r"(roc|confusion|loss|reliability|knn_val_auc|map)\.(png|pdf)",
             r"lr_range(_seed\d+)?\.(json|png|pdf)", r"provenance\.json", r"embeddings\.(npz|csv|parquet)",
             r"map\.npz", r"trackers\.json")
TENSORBOARD = "tensorboard"  # a run's folder of TensorBoard event files (--tensorboard)
# the folders W&B and MLflow log into (--logger), a run's own where its trackers.json names that tracker
TRACKER_FOLDERS = {"wandb": "wandb", "mlruns": "mlflow"}
# export.py's folder beside a checkpoint: exactly these files, nothing else
EXPORT = "export"
EXPORT_FILES = ("encoder.safetensors", "hf/config.json", "hf/model.safetensors", "hf/README.md")
_RUN_FILE = re.compile("|".join(RUN_FILES))
_EVENTS = re.compile(r"events\.out\.tfevents\..+")
# a checkpoint or a result, written atomically: once one is there the new run has started (see ASIDE)
_STARTED = re.compile(r"checkpoint(_seed\d+)?\.pt|seed_\d+\.json|metrics\.json|lr_range(_seed\d+)?\.json"
                      r"|embeddings\.npz")
# written beside a run by scripts/reproduce_lib.sh (the shell holds output.log open): left where they are
_BESIDE = ("output.log", "not_run.txt")
# _atomic_replace's temporary files of run files (mkstemp adds 8 characters of [a-z0-9_])
_TMP = re.compile(r"\.tmp-(?:%s)[a-z0-9_]{8}" % "|".join(RUN_FILES))


def _is_tensorboard(path):
    """A folder of TensorBoard event files only (in subfolders too, as add_scalars writes them)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    for root, dirs, files in os.walk(path):
        if any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return False
        if not all(_EVENTS.fullmatch(f) and not os.path.islink(os.path.join(root, f)) for f in files):
            return False
    return True


def _is_export(path):
    """A folder export.py wrote: its files (EXPORT_FILES, some of them) and nothing else."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    found = []
    for root, dirs, files in os.walk(path):
        if any(os.path.islink(os.path.join(root, n)) for n in dirs + files):
            return False
        found += [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/") for f in files]
    return all(f in EXPORT_FILES for f in found)


def _tracker_folder(out, name):
    """A W&B or MLflow folder of the run in `out`: its trackers.json (a run file) names that tracker."""
    path = os.path.join(out, name)
    if os.path.islink(path) or not os.path.isdir(path) or not _owned(out, "trackers.json"):
        return False
    try:
        with open(os.path.join(out, "trackers.json")) as f:
            return TRACKER_FOLDERS[name] in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def _owned(out, name):
    """Whether `name` in `out` is a file (or a folder: TensorBoard's, W&B's, MLflow's, an export) of a
    run, by its name."""
    path = os.path.join(out, name)
    if name == TENSORBOARD:
        return _is_tensorboard(path)
    if name == EXPORT:
        return _is_export(path)
    if name in TRACKER_FOLDERS:
        return _tracker_folder(out, name)
    return bool(_RUN_FILE.fullmatch(name)) and os.path.isfile(path) and not os.path.islink(path)


def _started(out):
    return any(_STARTED.fullmatch(name) and _owned(out, name) for name in os.listdir(out))


def _foreign(out):
    """What `out` holds that no run wrote, as the refusal names it. Hidden entries aside: they are
    never moved or removed, so they are in no one's way (a desktop's .DS_Store, a .git)."""
    found = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith(".") or name in _BESIDE or _owned(out, name):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            nested = os.path.lexists(os.path.join(path, "args.yaml"))
            found.append(f"{name}/" + (" (a run of its own)" if nested else ""))
        else:
            found.append(name)
    return found


def _listing(names, most=3):
    if len(names) > most:
        return ", ".join(names[:most]) + f" and {len(names) - most} more"
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


def can_overwrite(out):
    """Whether --overwrite would go ahead in `out`: it holds nothing that no run wrote. A message
    suggests --overwrite only then."""
    try:
        return not _foreign(out)
    except OSError:
        return False


def _or_overwrite(out, what=""):
    """', or pass --overwrite<what>' for a refusal's fix, where --overwrite would do it (can_overwrite)."""
    return f", or pass --overwrite{what}" if can_overwrite(out) else ""


# ---------------------------------------------------------------- --overwrite: moved aside, then dropped
# --overwrite goes in steps a kill may stop at any point; the name of the folder in `out` that holds
# the old run says how far it got, and the next run in `out` (under the lock) finishes or undoes it:
MOVING = ".old-run.moving"        # the old run's files are going into it: they all go back
ASIDE = ".old-run"                # all of them are in it. The new run has started once it has written a
#                                   checkpoint or a result (_STARTED, made whole by os.replace): then the
#                                   old run is dropped; until then it goes back and the new run's files go
RESTORING = ".old-run.restoring"  # the new run's files are gone, the old run's are going back: the rest follow
DROPPED = ".old-run.dropped"      # the new run has started: it is deleted
STAGES = (MOVING, ASIDE, RESTORING, DROPPED)
_pending = {}  # realpath of out -> out, while this process's new run has not started


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _move_back(folder, out):
    """Every entry of `folder` back into `out`, then `folder` removed; a name `out` holds already is
    never replaced (a UserError, both kept)."""
    for name in sorted(os.listdir(folder)):
        if os.path.lexists(os.path.join(out, name)):
            raise UserError(f"{out} holds {name}, and so does {folder}, the earlier run that an interrupted "
                            f"--overwrite was putting back; move one of them away, then run again")
        os.rename(os.path.join(folder, name), os.path.join(out, name))
    os.rmdir(folder)
    _fsync_dir(out)


def _move_aside(out, names):
    moving = os.path.join(out, MOVING)
    try:
        os.mkdir(moving)
        for name in names:
            os.rename(os.path.join(out, name), os.path.join(moving, name))
        os.rename(moving, os.path.join(out, ASIDE))  # every file is aside: from here on the new run writes
        _fsync_dir(out)
    except OSError as e:
        try:
            if os.path.isdir(moving):
                _move_back(moving, out)
        except OSError:
            pass  # the next run in `out` puts them back
        raise _os_error(e, f"cannot move the old run in {out} aside for --overwrite")
    _pending[os.path.realpath(out)] = out
    print(f"note: the old run in {out} is kept in {os.path.join(out, ASIDE)} until this one has written its "
          f"first checkpoint or result")


def restore_overwritten(out, old):
    """Put a run that --overwrite moved into `old` back into `out`, removing the new run's own files
    first (by their names: nothing of anyone else's). The new run has not started (_started): it has
    no checkpoint or result to lose."""
    for name in sorted(os.listdir(out)):
        if _owned(out, name):
            _remove(os.path.join(out, name))
    restoring = os.path.join(out, RESTORING)
    os.rename(old, restoring)  # the new run's files are gone: a kill from here on only goes on putting back
    _move_back(restoring, out)


def _drop(out):
    aside, dropped = os.path.join(out, ASIDE), os.path.join(out, DROPPED)
    if os.path.lexists(aside):
        os.rename(aside, dropped)
    if os.path.lexists(dropped):
        shutil.rmtree(dropped)


def commit_overwrite(out):
    """The new run in `out` has started (a checkpoint or a result is written, or it finished): delete
    the old run that --overwrite moved aside. _atomic_replace and finish_overwrite call it."""
    if _pending.pop(os.path.realpath(out), None) is None:
        return
    try:
        _drop(out)
    except OSError as e:
        print(f"note: could not delete the old run in {os.path.join(out, DROPPED)} ({e.strerror}); the next run "
              f"in {out} deletes it")


def finish_overwrite(ok):
    """At the process's end (cli.run_main): drop the old runs of the runs that started or finished
    (ok), put them back otherwise (bad input, an interrupt, a crash before a checkpoint or result)."""
    for key, out in list(_pending.items()):
        try:
            if ok or _started(out):
                commit_overwrite(out)
                continue
            _pending.pop(key)
            restore_overwritten(out, os.path.join(out, ASIDE))
        except (OSError, UserError) as e:
            _pending.pop(key, None)
            print(f"error: the old run in {out} could not be put back yet ({getattr(e, 'strerror', None) or e}); "
                  f"it is kept there in a folder named {ASIDE}*, and the next run in {out} puts it back")


def _legacy(out):
    """Folders .old-* that hold a run's files and nothing else (its args.yaml among them): what an
    earlier MedSSL's --overwrite moved aside. A folder of a user's named so is none of them."""
    for name in sorted(os.listdir(out)):
        old = os.path.join(out, name)
        if name.startswith(".old-") and name not in STAGES and os.path.isdir(old) and not os.path.islink(old):
            names = os.listdir(old)
            if "args.yaml" in names and all(_owned(old, n) for n in names):
                yield old


def _recover(out):
    """Finish or undo an --overwrite a kill stopped part-way (see MOVING...DROPPED; we hold the lock),
    then put back a run that an earlier MedSSL's --overwrite left in .old-<time>-<pid> (_legacy)."""
    _pending.pop(os.path.realpath(out), None)
    at = {stage: os.path.join(out, stage) for stage in STAGES}
    try:
        if os.path.lexists(at[DROPPED]) or (os.path.lexists(at[ASIDE]) and _started(out)):
            _drop(out)
        for stage in (MOVING, RESTORING):
            if os.path.lexists(at[stage]):
                _move_back(at[stage], out)
                print(f"note: put back the run in {out} that an interrupted --overwrite had moved aside")
        if os.path.lexists(at[ASIDE]):
            restore_overwritten(out, at[ASIDE])
            print(f"note: put back the run in {out} that an interrupted --overwrite had moved aside")
        for old in _legacy(out):
            # how far it got is unknown: it goes back only where nothing of a newer run is in its way
            if _started(out) or any(os.path.lexists(os.path.join(out, n)) for n in os.listdir(old)):
                raise UserError(f"{old} holds a run that an interrupted --overwrite moved aside, and {out} holds "
                                f"files of a newer run; keep what you need from {old}, delete it, then run again")
            _move_back(old, out)
            print(f"note: put back the run in {out} that an interrupted --overwrite had moved aside")
    except OSError as e:
        raise _os_error(e, f"cannot finish the interrupted --overwrite in {out}")


# ---------------------------------------------------------------- what a run is made from
# provenance.json, written right after args.yaml when a run starts: what the same command line cannot
# show, the content of the run's inputs (each --data source's hash, the encoder file's sha256 and its
# pretraining epoch, the torchrun processes). A resume on other inputs would mix two runs in one
# checkpoint or one metrics.json, so it is refused. A file of its own, not keys of args.yaml: args.yaml
# holds the flags as given (a difference there is "a different command", and it is the checkpoint's
# meta["args"]); these are measured, and a difference is named as a changed input.
PROVENANCE = "provenance.json"
NAMED_WEIGHTS = ("random", "imagenet", "barlowtwins")  # inits that are no file of the user's
_sha256s = {}


def file_sha256(path):
    """sha256 of a file's content, streamed (hashlib.file_digest); read once per file version in a
    process (a version: its size, mtime, ctime and inode)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _sha256s:
        try:
            with open(path, "rb") as f:
                _sha256s[key] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise _os_error(e, f"cannot read {path}", "check the file's permissions")
    return _sha256s[key]


def provenance(data, encoder=None, epoch=None, world_size=None):
    """What a run is made from, as provenance.json records it: `data` {--data source: its
    DatasetInfo.hash}; `encoder` (--ckpt / --init) a weights file, recorded by its content's sha256 and
    `epoch` (a pretraining checkpoint's epoch), or a named init (random, imagenet); `world_size` the
    torchrun processes (pretraining: each one's batch, which BatchNorm normalises over, depends on it).
    An argument left None is not recorded, and not checked."""
    record = {"data": {str(k): str(v) for k, v in data.items()}}
    if encoder is not None:
        if encoder in NAMED_WEIGHTS or not os.path.isfile(encoder):
            record["encoder"] = {"name": str(encoder)}
        else:
            record["encoder"] = {"file": os.path.abspath(encoder), "sha256": file_sha256(encoder), "epoch": epoch}
    if world_size is not None:
        record["world_size"] = int(world_size)
    return record


def _weights(encoder):
    if "sha256" not in encoder:
        return str(encoder.get("name"))
    epoch = f" (pretraining epoch {encoder['epoch']})" if encoder.get("epoch") is not None else ""
    return f"sha256 {encoder['sha256'][:12]}{epoch}"


def input_changes(recorded, current):
    """What differs between two provenance() records: [(the change, its fix)], a change naming the input
    with its old and new value. What either does not record is not compared (a run of an earlier
    MedSSL, a caller that records less)."""
    changes = []
    old, new = recorded.get("data"), current.get("data")
    if isinstance(old, dict) and isinstance(new, dict):
        for source in sorted(set(old) & set(new)):
            if old[source] != new[source]:
                changes.append((f"data {source}: hash {str(old[source])[:12]} there, {str(new[source])[:12]} now",
                                "restore the data it was started on"))
    old, new = recorded.get("encoder"), current.get("encoder")
    if isinstance(old, dict) and isinstance(new, dict) and \
            (old.get("sha256"), old.get("name")) != (new.get("sha256"), new.get("name")):
        changes.append((f"encoder {new.get('file') or new.get('name')}: {_weights(old)} there, {_weights(new)} now",
                        "restore the encoder file it was started with"))
    old, new = recorded.get("world_size"), current.get("world_size")
    if isinstance(old, int) and isinstance(new, int) and old != new:
        again = f"torchrun --nproc-per-node {old}" if old > 1 else "one process (no torchrun)"
        changes.append((f"torchrun processes: {old} there, {new} now (each process's batch, which BatchNorm "
                        f"normalises over, would change mid-run)", f"run it again with {again}"))
    return changes


def check_inputs(out, inputs):
    """Refuse to resume the run in `out` on other inputs than its provenance.json records
    (input_changes), in one line naming each change and the fix; nothing in `out` is changed. A run
    that records none (started by an earlier MedSSL, or killed before it wrote the file) records
    `inputs` now."""
    path = os.path.join(out, PROVENANCE)
    if not os.path.lexists(path):
        if _started(out):
            print(f"note: {out} does not record what its finished part was made from (an earlier MedSSL "
                  f"started it); it is taken to be these same data and encoder, recorded from now on", flush=True)
        atomic_write_text(path, json.dumps(inputs, indent=1, sort_keys=True))
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        recorded = e
    if not isinstance(recorded, dict):
        raise UserError(f"{path} is unreadable or corrupt, so this resume cannot be checked against the inputs the "
                        f"run was started on; start it again with another --out{_or_overwrite(out)}")
    changes = input_changes(recorded, inputs)
    if changes:
        fixes = list(dict.fromkeys(fix for _, fix in changes))
        again = "--overwrite or another --out" if can_overwrite(out) else "another --out"
        raise UserError(f"{out} was started on other inputs than this resume's ({'; '.join(c for c, _ in changes)}), "
                        f"and one run must not mix them; {' and '.join(fixes)}, or start it again with {again}")


# ---------------------------------------------------------------- run directories
def _read_args(path):
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        saved = e
    if not isinstance(saved, dict):
        raise UserError(f"{path} is unreadable or corrupt, so this run cannot be checked or resumed; choose "
                        f"another --out{_or_overwrite(os.path.dirname(path) or '.', ' to start afresh')}")
    return saved


# Flags that came after runs already on disk, with the value that reproduces what those runs did: an
# args.yaml without the flag ran with that value, so it still resumes as the same command.
FLAGS_ADDED = {"allow_group_leak": False, "group_column": None, "class_weight": "none",
               "temperature_scaling": False, "lr_biases": None, "final_lr_fraction": 0.0,
               "optimizer": "adam",  # pretrain_byol.py ran Adam before it had --optimizer
               "precision": "auto"}


def _different_command(out, mine, theirs):
    """The UserError for a resume whose flags differ from the run's args.yaml, or None when they agree.
    A flag whose saved value a command line can give back is named with that value, as the way to
    continue the run."""
    theirs = {**{k: v for k, v in FLAGS_ADDED.items() if k in mine}, **theirs}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not diff:
        return None
    k, value = diff[0], theirs.get(diff[0])
    flag = "--" + k.replace("_", "-")
    scalar = isinstance(value, (int, float, str)) and not isinstance(value, bool) and k in mine
    again = f"pass {flag} {value} to continue it, or " if scalar else ""
    return UserError(f"{out} holds a run of a different command ({k}: {value!r} there, {mine.get(k)!r} now); "
                     f"{again}choose another --out{_or_overwrite(out)}")


def prepare_run_dir(out, flags, done_file, inputs=None):
    """Create `out`, lock it for this process and check that it belongs to this command (`flags`: the
    dict of its resolved flags, "overwrite" among them). Returns True when the run was started before
    and is unfinished (the caller resumes); refuses finished or foreign runs, and a resume whose
    `inputs` (provenance(): data, encoder, processes) differ from those the run was started on. With
    --overwrite the old run's own files (RUN_FILES) are moved aside, to be dropped once this run has
    written a checkpoint or a result, put back if it ends before (commit_overwrite, finish_overwrite); a
    folder holding anything else is refused as it is."""
    _make_dir(out)
    lock_run_dir(out)
    for name in os.listdir(out):  # left by a run killed while it wrote a file (we hold the lock)
        if _TMP.fullmatch(name):
            os.remove(os.path.join(out, name))
    _recover(out)
    progress.update(out=out, overwrite=bool(flags["overwrite"]), checkpoint=None)
    args_path = os.path.join(out, "args.yaml")
    mine = {k: v for k, v in flags.items() if k not in _RELAUNCH_FLAGS}
    if os.path.exists(args_path) and not flags["overwrite"]:
        theirs = {k: v for k, v in _read_args(args_path).items() if k not in _RELAUNCH_FLAGS}
        error = _different_command(out, mine, theirs)
        if error:
            raise error
        if done_file and os.path.exists(os.path.join(out, done_file)):
            raise UserError(f"{out} holds a finished run; choose another --out{_or_overwrite(out, ' to redo it')}")
        if inputs is not None:
            check_inputs(out, inputs)
        return True
    ours = [name for name in sorted(os.listdir(out)) if _owned(out, name)]
    if ours and not _owned(out, "args.yaml"):
        raise UserError(f"{out} holds {ours[0]} but no args.yaml, so nothing shows that a MedSSL run wrote it; "
                        f"choose another --out")
    if ours:
        foreign = _foreign(out)
        if foreign:
            raise UserError(f"{out} holds {_listing(foreign)}, which MedSSL did not write; --overwrite removes only "
                            f"a run's own files, so it leaves this folder as it is: choose another --out")
        _move_aside(out, ours)
    atomic_write_text(args_path, yaml.safe_dump(flags, sort_keys=True))
    if inputs is not None:
        atomic_write_text(os.path.join(out, PROVENANCE), json.dumps(inputs, indent=1, sort_keys=True))
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
                raise UserError(f"{path} line {n} is not JSON; delete that line"
                                f"{_or_overwrite(os.path.dirname(path) or '.', ' to start afresh')}")
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
    if _STARTED.fullmatch(os.path.basename(path)):  # a checkpoint or result of a new run: it has started
        commit_overwrite(folder)


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
    checkpoint (errors.progress). A run's checkpoint (checkpoint[_seedN].pt) says that a new run has
    started: the run --overwrite set aside is dropped (_atomic_replace)."""
    position = {k: state[k] for k in ("epoch", "step") if isinstance(state.get(k), int)}
    _atomic_replace(path, lambda f: _torch_save(_cpu(state), f),
                    replaced=lambda: progress.update(checkpoint=path, **position))


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
                        f"--device {saved}{_or_overwrite(progress.out, ' to start afresh') if progress.out else ''}")


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


def run_state_keys():
    """The entries run_state writes besides the named objects and the extra values."""
    return ("epoch", "step", "step_in_epoch", "epoch_losses", "rng", "meta", "rank_digests")


def restore_run(state, objects, aug_generator):
    """Load a run_state dict back into the named modules, optimisers and the generators; returns its
    position, the keyword arguments run_state took, for start_epoch. No state: a new run's position."""
    if state is None:
        return {"epoch": 0, "step": 0, "step_in_epoch": 0}
    _check_device(state["rng"], aug_generator)  # before anything is loaded
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except (ValueError, RuntimeError, KeyError) as e:  # e.g. an optimiser of another layout of groups
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"the checkpoint's {name} does not fit this run's ({first}): it was written by a "
                            f"run of another setup or MedSSL version; start again with another --out")
    set_rng_state(state["rng"], aug_generator)
    # .get: checkpoints written before mid-epoch resume existed hold epoch ends only
    return {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state.get("step_in_epoch", 0),
            "epoch_start": state["rng"].get("epoch_start"), "losses": state.get("epoch_losses", torch.zeros(0))}


RUN_KEYS = ("epoch", "step", "rng", "meta")


def open_run(out, flags, inputs=None):
    """Set up the run directory `out` (prepare_run_dir, `flags` the run's resolved flags, `inputs` what
    it is made from: provenance()) and return the checkpoint of the unfinished run in it, or None for a
    new run; a finished run, or one started on other inputs, is refused. The log is cut back to the
    checkpoint's position (lines of epochs to be redone and a torn last line go). Under torchrun rank 0
    does this and sends the checkpoint to every rank (`out` need only be on rank 0's filesystem)."""
    def on_rank_0():
        resume = prepare_run_dir(out, flags, done_file=None, inputs=inputs)
        path, log = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")
        if not resume:
            return None
        if not os.path.lexists(path):  # killed before its first checkpoint: it starts again from scratch
            cut_log(log, lambda record: False)
            return None
        state = load_checkpoint(path)
        if not (isinstance(state, dict) and all(k in state for k in RUN_KEYS)
                and isinstance(state["meta"], dict) and state["meta"].get("format") == "medssl"):
            # not --overwrite, which removes a run's files by their names: this one is no run's
            raise UserError(f"{path} is not a checkpoint of a MedSSL training run; move it away to start this "
                            f"run afresh")
        if state["epoch"] >= flags["epochs"]:
            raise UserError(f"{out} holds a finished run; choose another --out{_or_overwrite(out, ' to redo it')}")
        # an epoch's line is logged before its checkpoint: the lines of epochs to be redone go
        cut_log(log, lambda record: isinstance(record.get("epoch"), int) and record["epoch"] < state["epoch"])
        progress.update(checkpoint=path, epoch=state["epoch"], step=state["step"])
        return state
    return dist.on_main(on_rank_0)
