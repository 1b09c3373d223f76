"""common/rundir.py: atomic files, RNG state, run directories."""
import hashlib
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from common import cli, rundir
from common.errors import UserError
from test_cli import _parser


def test_atomic_write_survives_a_crash_between_write_and_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    rundir.save_checkpoint({"epoch": 1}, path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed before rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]            # and no temporary file is left


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    cli.seed_everything(1)
    rundir.save_checkpoint({"rng": rundir.rng_state(gen)}, str(tmp_path / "c.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    state = rundir.load_checkpoint(str(tmp_path / "c.pt"))
    cli.seed_everything(99)
    gen2 = torch.Generator().manual_seed(0)
    rundir.set_rng_state(state["rng"], gen2)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_run_dir_refuses_a_different_command_and_a_finished_run(tmp_path):
    out = str(tmp_path / "run")
    args = cli.parse_args(_parser(), ["--out", out])
    assert rundir.prepare_run_dir(out, vars(args), done_file="metrics.json") is False
    assert rundir.prepare_run_dir(out, vars(args), done_file="metrics.json") is True   # unfinished: resume
    other = cli.parse_args(_parser(), ["--out", out, "--lr", "0.3"])
    with pytest.raises(UserError, match="different command"):
        rundir.prepare_run_dir(out, vars(other), done_file="metrics.json")
    open(os.path.join(out, "metrics.json"), "w").close()
    with pytest.raises(UserError, match="finished run"):
        rundir.prepare_run_dir(out, vars(args), done_file="metrics.json")
    redo = cli.parse_args(_parser(), ["--out", out, "--lr", "0.3", "--overwrite"])
    assert rundir.prepare_run_dir(out, vars(redo), done_file="metrics.json") is False


# ---------------------------------------------------------------- --overwrite removes only what a run wrote
def _flags(*argv):
    """A command's flags; "out" is the same for every folder, so that args.yaml compares across copies."""
    return vars(cli.parse_args(_parser(), ["--out", "RUN", *argv]))


OLD, NEW, NEW_AGAIN = _flags("--lr", "0.1"), _flags("--lr", "0.3", "--overwrite"), _flags("--lr", "0.3")


def _digest(folder, hidden=True):
    """Every file under `folder` (its .lock aside) -> the SHA-256 of its bytes."""
    sums = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if hidden or not d.startswith(".")]
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock" and (hidden or not os.path.relpath(path, folder).startswith(".")):
                with open(path, "rb") as f:
                    sums[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return sums


def _run(out, flags, tag, fail=False, finish=True):
    """What a script does to its run directory, each file marked with `tag`: prepare_run_dir, a log
    line, a TensorBoard event file, then (unless it fails first) a checkpoint, a seed's result, a plot
    written in place and metrics.json; then run_main's finish_overwrite."""
    out = str(out)
    rundir.prepare_run_dir(out, flags, done_file="metrics.json")
    rundir.append_jsonl(os.path.join(out, "log.jsonl"), {"run": tag})
    os.makedirs(os.path.join(out, "tensorboard"), exist_ok=True)
    with open(os.path.join(out, "tensorboard", "events.out.tfevents.1.host"), "w") as f:
        f.write(tag)
    if fail:
        if finish:
            rundir.finish_overwrite(ok=False)
        return
    rundir.save_checkpoint({"run": tag}, os.path.join(out, "checkpoint_seed0.pt"))
    rundir.atomic_write_text(os.path.join(out, "seed_0.json"), tag)
    with open(os.path.join(out, "roc.png"), "w") as f:
        f.write(tag)
    rundir.atomic_write_text(os.path.join(out, "metrics.json"), tag)
    if finish:
        rundir.finish_overwrite(ok=True)


@pytest.fixture
def no_pending():
    rundir._pending.clear()
    yield
    rundir._pending.clear()


def _refusal(capsys, call):
    """The one line run_main prints for call()'s UserError (exit code 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(call)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("case", ["user files", "data folder", "nested run", "foreign tensorboard"])
def test_overwrite_refuses_a_folder_holding_what_no_run_wrote_and_changes_nothing(tmp_path, capsys, no_pending,
                                                                                   case):
    out = tmp_path / "run"
    out.mkdir()
    named = {"user files": "my_figure.png and xray.png", "data folder": "img_000.png, img_001.png, img_002.png "
             "and 151 more", "nested run": "eval/ (a run of its own)", "foreign tensorboard": "tensorboard/"}[case]
    if case == "data folder":  # images and their labels; --overwrite from the start is a new run beside them
        for i in range(153):
            (out / f"img_{i:03d}.png").write_bytes(bytes([i]) * 10)
        (out / "labels.csv").write_text("image,label\n")
        _run(out, NEW, "old")
    else:
        _run(out, OLD, "old")
    if case == "user files":
        (out / "xray.png").write_bytes(b"\x89PNG xray")
        (out / "my_figure.png").write_bytes(b"\x89PNG figure")
    elif case == "nested run":
        _run(out / "eval", OLD, "eval")
    elif case == "foreign tensorboard":
        (out / "tensorboard" / "notes.txt").write_text("mine")
    (tmp_path / "beside.txt").write_text("mine")
    before = _digest(tmp_path)

    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), NEW, done_file="metrics.json"))
    assert line == f"error: {out} holds {named}, which MedSSL did not write; --overwrite removes only a run's own " \
                   f"files, so it leaves this folder as it is: choose another --out"
    # without --overwrite: the refusal does not suggest what would be refused
    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), NEW_AGAIN if case == "data folder" else OLD,
                                                           done_file="metrics.json"))
    assert line == f"error: {out} holds a finished run; choose another --out"
    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), _flags("--lr", "0.7"), done_file="metrics.json"))
    assert "holds a run of a different command" in line and "--overwrite" not in line
    assert _digest(tmp_path) == before
    if case == "nested run":  # the nested run is a run of its own: it can be overwritten alone
        _run(out / "eval", NEW, "new eval")
        assert _digest(out / "eval")["metrics.json"] == hashlib.sha256(b"new eval").hexdigest()
        assert {k: v for k, v in _digest(tmp_path).items() if not k.startswith("run/eval/")} == \
            {k: v for k, v in before.items() if not k.startswith("run/eval/")}


def test_overwrite_removes_the_runs_files_alone(tmp_path, capsys, no_pending):
    out = tmp_path / "run"
    _run(out, OLD, "old")
    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), OLD, done_file="metrics.json"))
    assert line == f"error: {out} holds a finished run; choose another --out, or pass --overwrite to redo it"
    # a hidden file of the user's, a user's temporary-looking file, the log a reproduction script keeps
    # beside the run, and a file beside the folder: none is the run's, and none is in the way
    kept = {".DS_Store": "finder", ".tmp-notes": "mine", "output.log": "shell", "../beside.png": "mine"}
    for name, text in kept.items():
        (out / name).write_text(text)
    _run(out, NEW, "new", finish=False)  # its first checkpoint drops the old run at once
    assert sorted(os.listdir(out)) == [".DS_Store", ".lock", ".tmp-notes", "args.yaml", "checkpoint_seed0.pt",
                                       "log.jsonl", "metrics.json", "output.log", "roc.png", "seed_0.json",
                                       "tensorboard"]
    for name, text in kept.items():
        assert (out / name).read_text() == text
    assert rundir.load_checkpoint(str(out / "checkpoint_seed0.pt")) == {"run": "new"}
    assert (out / "log.jsonl").read_text() == '{"run": "new"}\n'


def _outputs(out, trackers):
    """What a run's optional outputs add to its folder: vector figures, an export beside the checkpoint,
    and the W&B and MLflow folders of the trackers its trackers.json names."""
    for name in ("roc.pdf", "loss.pdf", "lr_range.pdf", "embeddings.csv", "map.png"):
        (out / name).write_text("run")
    for name in rundir.EXPORT_FILES:
        (out / "export" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "export" / name).write_text("run")
    (out / "trackers.json").write_text(json.dumps({t: "id0" for t in trackers}))
    for folder in ("wandb/offline-run-1/files", "mlruns/0/abc/metrics"):
        os.makedirs(out / folder)
        (out / folder / "values").write_text("run")


@pytest.mark.parametrize("case", ["all ours", "export with a user's file", "wandb not in trackers.json"])
def test_overwrite_takes_exports_figures_and_tracker_folders_only_when_the_run_wrote_them(tmp_path, capsys,
                                                                                          no_pending, case):
    out = tmp_path / "run"
    _run(out, OLD, "old")
    _outputs(out, ["mlflow"] if case == "wandb not in trackers.json" else ["wandb", "mlflow"])
    if case == "export with a user's file":
        (out / "export" / "hf" / "notes.md").write_text("mine")
    before = _digest(tmp_path)
    if case == "all ours":
        _run(out, NEW, "new")
        assert sorted(os.listdir(out)) == [".lock", "args.yaml", "checkpoint_seed0.pt", "log.jsonl", "metrics.json",
                                           "roc.png", "seed_0.json", "tensorboard"]
        return
    named = {"export with a user's file": "export/", "wandb not in trackers.json": "wandb/"}[case]
    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), NEW, done_file="metrics.json"))
    assert line.startswith(f"error: {out} holds {named}, which MedSSL did not write")
    assert _digest(tmp_path) == before


def test_export_files_are_the_ones_export_py_writes():
    import export
    assert set(rundir.EXPORT_FILES) == {export.ENCODER_FILE} | {f"{export.HF_DIR}/{n}" for n in export.HF_FILES}


def test_every_file_the_scripts_write_into_a_run_directory_is_a_run_file():
    """A file a script writes into its --out that RUN_FILES lacks would make --overwrite refuse every
    run of that script: each os.path.join(out, "<name>") of the scripts and common/ is one of them."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(repo, name) for name in os.listdir(repo) if name.endswith(".py")]
    sources += [os.path.join(repo, "common", name) for name in os.listdir(os.path.join(repo, "common"))
                if name.endswith(".py") and name != "rundir.py"]
    found = set()
    for path in sources:
        with open(path) as f:
            found |= set(re.findall(r"join\((?:args\.|run\.|self\.)?out, f?\"([^\"]+)\"", f.read()))
    # a placeholder extension stands for each value its flag takes (embed.py's --format, a figure's PDF and PNG)
    values = {"args.format": ("csv", "parquet"), "ext": ("png", "pdf")}
    files = set()
    for name in (n for n in found if "." in n):
        placeholder = re.fullmatch(r"(.*)\.\{([^}]*)\}", name)
        names = [f"{placeholder[1]}.{ext}" for ext in values[placeholder[2]]] if placeholder else [name]
        files |= {re.sub(r"\{[^}]*\}", "0", n) for n in names}
    assert {"metrics.json", "checkpoint.pt", "checkpoint_seed0.pt", "seed_0.json", "loss.png"} <= files
    assert [name for name in sorted(files) if not rundir._RUN_FILE.fullmatch(name)] == []
    assert "tensorboard" in found and rundir.TENSORBOARD == "tensorboard"


def test_files_named_like_a_runs_without_its_args_yaml_are_nobodys_to_remove(tmp_path, capsys, no_pending):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "roc.png").write_bytes(b"\x89PNG")
    before = _digest(out)
    for flags in (OLD, NEW):
        line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), flags, done_file="metrics.json"))
        assert line == f"error: {out} holds metrics.json but no args.yaml, so nothing shows that a MedSSL run " \
                       f"wrote it; choose another --out"
    assert _digest(out) == before


def test_a_run_an_earlier_version_left_aside_goes_back_only_where_nothing_is_in_its_way(tmp_path, capsys,
                                                                                        no_pending):
    out = tmp_path / "run"
    _run(out, OLD, "old")
    photos = out / ".old-photos"  # a hidden folder of the user's, named alike: not a run, left alone
    photos.mkdir()
    (photos / "cat.png").write_text("mine")
    old = out / ".old-20240101-120000-42"  # the whole run, as that version moved it aside
    old.mkdir()
    for name in os.listdir(out):
        if not name.startswith("."):
            os.rename(out / name, old / name)
    (out / "metrics.json").write_text("a newer run's")
    before = _digest(tmp_path)
    line = _refusal(capsys, lambda: rundir.prepare_run_dir(str(out), OLD, done_file="metrics.json"))
    assert f"{old} holds a run that an interrupted --overwrite moved aside" in line
    assert _digest(tmp_path) == before
    (out / "metrics.json").unlink()
    with pytest.raises(UserError, match="finished run"):  # back in place, it is the finished run it was
        rundir.prepare_run_dir(str(out), OLD, done_file="metrics.json")
    assert not old.exists() and (out / "metrics.json").read_text() == "old"
    assert (photos / "cat.png").read_text() == "mine" and not (out / "cat.png").exists()


# ---------------------------------------------------------------- --overwrite and SIGKILL
CHANGES = ("rename", "replace", "remove", "unlink", "rmdir", "mkdir")  # every change to the file system


def _in_child(work, kill_at=None, at_kill=None):
    """work() in a forked process that counts its changes to the file system (the os functions in
    CHANGES) and, with kill_at, SIGKILLs itself just before the kill_at-th, after at_kill() (a look at
    the folder). Returns the number of changes it made, or None when it was killed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read)
            rundir._pending.clear()
            count, real = [0], {name: getattr(os, name) for name in CHANGES}

            def counted(name):
                def change(*args, **kwargs):
                    count[0] += 1
                    if count[0] == kill_at:
                        at_kill()
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real[name](*args, **kwargs)
                return change
            for name in CHANGES:
                setattr(os, name, counted(name))
            try:
                work()
            except UserError:
                pass
            os.write(write, str(count[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    made = os.read(read, 32)
    os.close(read)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    assert os.WEXITSTATUS(status) == 0
    return int(made)


def _check_whole(out, old, new_at_kill):
    """After a kill and a run again: the old run as it was, or the new one with every file it had
    written, unchanged, and nothing of the old. Returns which."""
    state = _digest(out)
    assert (out.parent / "beside.txt").read_text() == "mine" and (out / ".keep").read_text() == "mine"
    if state == old:
        return "old"
    visible = _digest(out, hidden=False)
    assert not [name for name in os.listdir(out) if name.startswith((".old-", ".tmp-"))], os.listdir(out)
    assert visible == new_at_kill, (visible, new_at_kill)  # nothing of the new run lost or changed
    assert not set(visible.values()) & {v for k, v in old.items() if not k.startswith(".")}, "a mix"
    assert "lr: 0.3" in (out / "args.yaml").read_text()
    return "new"


@pytest.mark.parametrize("fail", [False, True], ids=["the new run starts", "the new run fails before"])
def test_a_kill_at_any_step_of_overwrite_leaves_the_old_or_the_new_run_whole(tmp_path, no_pending, fail):
    """SIGKILL before each change to the file system that --overwrite and the new run make (moving the
    old run aside, the new run's files, dropping the old run or putting it back), then the same
    command again: the old run whole, or the new one, never a mix; once the new run has written a
    checkpoint, it is the one kept. Then a kill during that recovery too, from each state found."""
    template = tmp_path / "template" / "run"
    template.mkdir(parents=True)
    (template.parent / "beside.txt").write_text("mine")
    (template / ".keep").write_text("mine")
    assert _in_child(lambda: _run(template, OLD, "old")) > 0
    old = _digest(template)
    new_run = lambda out: lambda: _run(out, NEW, "new", fail=fail)  # noqa: E731
    again = lambda out: lambda: rundir.prepare_run_dir(str(out), NEW_AGAIN, done_file="metrics.json")  # noqa: E731
    changes = _in_child(new_run(_trial(template, tmp_path / "count")))
    # a failing run: the kills from its failure on (those before it, the other case has)
    first = _in_child(lambda: _run(_trial(template, tmp_path / "first"), NEW, "new", fail=True, finish=False)) + 1 \
        if fail else 1
    outcomes, states = {}, {}
    for k in range(first, changes + 1):
        out, seen = _trial(template, tmp_path / f"k{k}"), tmp_path / f"k{k}.json"

        def look():  # in the child, as it is killed: what the new run had written, whether it had started
            args = out / "args.yaml"         # (a checkpoint or result beside its args), how far --overwrite got
            started = any((out / name).exists() for name in ("checkpoint_seed0.pt", "seed_0.json", "metrics.json")) \
                and args.exists() and "lr: 0.3" in args.read_text()
            seen.write_text(json.dumps([_digest(out, hidden=False), started,
                                        sorted(n for n in os.listdir(out) if n.startswith(".old-"))]))
        assert _in_child(new_run(out), kill_at=k, at_kill=look) is None
        new_at_kill, started, stages = json.loads(seen.read_text())
        if stages and (started, *stages) not in states:
            states[(started, *stages)] = _trial(out, tmp_path / f"state{k}")
        _again(out)
        outcomes[k] = _check_whole(out, old, new_at_kill)
        assert not (started or fail) or outcomes[k] == ("old" if fail else "new"), k
    assert set(outcomes.values()) == ({"old"} if fail else {"old", "new"})
    assert len(states) >= (2 if fail else 3), states  # (moving) aside, and dropping or putting back
    for (started, *_), killed in states.items():
        recovery = _in_child(again(_trial(killed, tmp_path / "recovery")))
        shutil.rmtree(tmp_path / "recovery")
        for j in range(1, recovery + 1):
            out = _trial(killed, tmp_path / "recovery")
            new_at_kill = _digest(out, hidden=False)
            assert _in_child(again(out), kill_at=j, at_kill=lambda: None) is None
            _again(out)
            assert _check_whole(out, old, new_at_kill) == ("new" if started else "old"), j
            shutil.rmtree(tmp_path / "recovery")


def _again(out):
    """The same command again (NEW without --overwrite), in this process; its lock let go after."""
    try:
        rundir.prepare_run_dir(str(out), NEW_AGAIN, done_file="metrics.json")
    except UserError:  # a different command (the old run is back) or a finished run
        pass
    finally:
        fd = rundir._locks.pop(os.path.realpath(out), None)
        if fd is not None:
            os.close(fd)


def _trial(run, to):
    """A copy of the folder holding `run` (beside.txt with it) as `to`, to try one kill on; its run."""
    shutil.copytree(run.parent, to, symlinks=True)
    return to / run.name
