"""Faults and nonsense input, one test per family, through the shared code every script runs
(common/cli.py, common/rundir.py, common/models.py): each case's exit code, its one line on stderr
(no traceback) and that nothing already written changed. Signals, a full disk, the lock held by another
process and a config read from the command line with real processes; the rest in this process through
cli.run_main, as a script runs. The flags every pretraining method shares are checked for each method
(common/methods.py); a run of a pretraining script is one method's (RUN: what it tests is the same for
all)."""
import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import cli, dist, errors, methods, models, rundir
from conftest import REAL_ROOT, REPO, digest, real_file_root, run_cli, run_main

TQDM = re.compile(r"^\s*epoch \d+: +\d+%\|")
PRETRAINING = tuple(m.script.removesuffix(".py") for m in methods.all_methods())  # every method's script
SCRIPTS = (*PRETRAINING, "evaluate", "finetune_beit")
# the method of the tests that run a pretraining script as a command (what they test is the same for all)
RUN = methods.all_methods()[0]
TINY_RUN = ["--data", "breastmnist", "--data-root", REAL_ROOT, "--epochs", "1", "--max-steps", "1",
            "--batch-size", "4", "--device", "cpu", *RUN.smoke_flags]


def parser_of(script):
    return importlib.import_module(script).get_args_parser()


def one_line(capsys, main, code=2):
    """Run main() as a script's `cli.run_main(main)`; check the exit code and that stderr is one
    line without a traceback; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, (e.value.code, err)
    return lines[0]


def stderr_lines(err):
    """stderr's lines without tqdm's progress bar, which shares it."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not TQDM.match(line)]


def cli_one_line(r, code=2):
    lines = stderr_lines(r.stderr)
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    return lines[0]


pytestmark = pytest.mark.usefixtures("fresh_state")


# ---------------------------------------------------------------- configs and the command line
@pytest.mark.parametrize("script, text, needles", [
    *[(script, text, needles) for script in PRETRAINING for text, needles in (  # the flags every method shares
        ("epochs: 2.5", ["epochs: invalid int value: '2.5'"]),
        ("aug: nonsense", ["aug: unknown augmentation 'nonsense'"]),
        ("crop_scale: [0.2]", ["crop_scale: expected 2 values"]),
        ("sync_bn: 3", ["sync_bn: expected true or false"]),
        ("epochs: [", ["cannot read config"]))],
    ("evaluate", "device: tpu", ["device: invalid choice: 'tpu'"]),
    ("evaluate", "lr: [1, 2]", ["lr: expected one value"]),
    ("finetune_beit", "epochs: ten", ["epochs: invalid int value: 'ten'"]),
    ("finetune_beit", "lr: .nan", ["--lr must be positive and finite, got nan"]),  # and the ranges
])
def test_config_values_go_through_their_flags_checks(capsys, tmp_path, script, text, needles):
    config = tmp_path / "c.yaml"
    config.write_text(text + "\n")
    line = one_line(capsys, lambda: cli.parse_args(parser_of(script), ["--config", str(config)]))
    assert line.startswith("error: ") and (str(config) in line or "--lr" in line), line
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("script", SCRIPTS)
def test_command_line_errors_are_one_line_without_the_usage_block(capsys, script):
    line = one_line(capsys, lambda: cli.parse_args(parser_of(script), ["--epochs", "ten"]))
    assert line == "error: --epochs: invalid int value: 'ten'; see --help"
    assert "unrecognized arguments: --nope" in one_line(capsys, lambda: cli.parse_args(parser_of(script), ["--nope"]))


def test_a_bad_config_value_is_one_line_from_the_command_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: ten\n")
    line = cli_one_line(run_cli(RUN.script, "--config", str(config), "--out", str(tmp_path / "r")))
    assert line == f"error: config {config}: epochs: invalid int value: 'ten'"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- ranges
@pytest.mark.parametrize("script, flags, needle", [
    *[(script, flags, needle) for script in PRETRAINING for flags, needle in (  # the flags every method shares
        (["--crop-scale", "2", "1"], "--crop-scale must be in (0, 1], got 2.0"),
        (["--crop-scale", "0.9", "0.2"], "--crop-scale needs MIN <= MAX, got 0.9 0.2"),
        (["--warmup-epochs", "-5"], "--warmup-epochs must be 0 or more, got -5"),
        (["--final-lr-fraction", "1.5"], "--final-lr-fraction must be in [0, 1], got 1.5"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
        (["--lr", "nan"], "--lr must be positive and finite, got nan"),
        (["--lr", "inf"], "--lr must be positive and finite, got inf"),
        (["--batch-size", "1"], "--batch-size must be at least 2 (BatchNorm"))],
    ("pretrain_byol", ["--ema", "1.5"], "--ema must be in [0, 1], got 1.5"),
    ("pretrain_byol", ["--projector-out", "0"], "--projector-out must be positive, got 0"),
    ("evaluate", ["--seed", str(2 ** 32)], "--seed must be in [0, 2**32)"),
    ("pretrain_barlow", ["--lambd=-1/8192"], "--lambd must be 0 or more"),
    ("pretrain_barlow", ["--sparsity", "-0.1"], "--sparsity must be 0 or more"),
    ("pretrain_barlow", ["--freeze-encoder-epochs", "-1"], "--freeze-encoder-epochs must be 0 or more"),
    ("pretrain_barlow", ["--lr-range", "1", "0.1", "100"], "--lr-range needs START < END"),
    ("evaluate", ["--label-fraction", "0"], "--label-fraction must be in (0, 1], got 0.0"),
    ("evaluate", ["--shots", "0"], "--shots must be positive, got 0"),
    ("evaluate", ["--seeds", "0"], "--seeds must be positive, got 0"),
    ("evaluate", ["--val-every", "0"], "--val-every must be positive, got 0"),
    ("finetune_beit", ["--save-every", "1"], "unrecognized arguments"),  # flags differ between scripts
    ("finetune_beit", ["--max-steps", "0"], "--max-steps must be positive, got 0"),
    ("finetune_beit", ["--balance", "0.7"], "--balance must be in (0, 0.5], got 0.7"),
    ("finetune_beit", ["--size", "-28"], "--size must be positive"),
])
def test_numbers_out_of_range_are_refused_in_one_place(capsys, script, flags, needle):
    line = one_line(capsys, lambda: cli.parse_args(parser_of(script), flags))
    assert line.startswith("error: ") and needle in line, line


def test_every_numeric_flag_of_every_script_has_a_range():
    """A new int / float flag without an entry in cli.RANGES would go unchecked."""
    for script in SCRIPTS:
        for action in parser_of(script)._actions:
            numeric = action.type in (int, float, cli.lr_or_auto) or getattr(action.type, "__name__", "") == "number"
            if numeric and action.dest not in ("in_chans",):  # --in-chans has choices
                assert action.dest in cli.RANGES, (script, action.dest)


def test_a_range_can_be_overridden_per_script():
    args = cli.parse_args(parser_of("finetune_beit"), ["--batch-size", "1"], ranges={"batch_size": cli.AT_LEAST_1})
    assert args.batch_size == 1


# ---------------------------------------------------------------- the operating system says no
def test_out_naming_a_file_is_one_line_and_the_file_is_kept(real_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    line = one_line(capsys, lambda: run_main(monkeypatch, RUN.script, *TINY_RUN, "--out", str(out)))
    assert "is a file, not a folder" in line, line
    assert out.read_text() == "my notes\n"


def _make_unwritable(folder):
    if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)


@pytest.mark.parametrize("script", [RUN.script.removesuffix(".py"), "evaluate"])
def test_unwritable_out_and_a_folder_named_like_a_file(capsys, tmp_path, script):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = cli.parse_args(parser_of(script), ["--out", str(out)])
    undo = _make_unwritable(out)
    try:
        line = one_line(capsys, lambda: rundir.prepare_run_dir(str(out), vars(args), done_file="metrics.json"))
    finally:
        undo()
    assert f"cannot write in --out {out}" in line and "choose a folder you can write to" in line, line
    (out / "checkpoint.pt").mkdir()
    line = one_line(capsys, lambda: rundir.save_checkpoint({"epoch": 1}, str(out / "checkpoint.pt")))
    assert "checkpoint.pt is a folder, not a file" in line
    assert digest(out) == {"keep.txt": hashlib.sha256(b"x").hexdigest()}


def test_a_full_disk_during_a_save_is_one_line_and_the_old_file_is_kept(capsys, tmp_path):
    path = tmp_path / "checkpoint.pt"
    rundir.save_checkpoint({"w": torch.ones(3)}, str(path))
    before = digest(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")
    real_write = rundir._torch_save
    rundir._torch_save = lambda state, f: (f.write(b"partial"), full())
    try:
        line = one_line(capsys, lambda: rundir.save_checkpoint({"w": torch.zeros(3)}, str(path)))
    finally:
        rundir._torch_save = real_write
    assert "No space left on device (the disk or your quota is full)" in line and "previous one is kept" in line
    assert digest(tmp_path) == before  # no temporary file left either


# ---------------------------------------------------------------- --overwrite keeps the old run until the new one runs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny pretraining run, made once for the tests that try to overwrite it."""
    real_file_root()
    out = tmp_path_factory.mktemp("finished") / "run"
    command = [RUN.script, *TINY_RUN, "--out", str(out)]
    r = run_cli(*command)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, command


@pytest.mark.parametrize("fault, needle", [
    (["--init", "/nonexistent/checkpoint.pt"], "does not exist"),   # bad input found after the run dir is set up
    ("disk full", "(the disk or your quota is full)"),              # the first checkpoint cannot be written
])
def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_old_run(finished_run, fault, needle):
    out, command = finished_run
    before = digest(out)
    if fault == "disk full":  # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE fails with EFBIG
        limit = 2 ** 20
        r = subprocess.run([sys.executable, *command, "--overwrite"], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1",
                                "CUDA_VISIBLE_DEVICES": ""},
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    else:
        r = run_cli(*command, *fault, "--overwrite")
    assert needle in cli_one_line(r)
    assert digest(out) == before and not [n for n in os.listdir(out) if n.startswith((".old-", ".tmp-"))]


def test_overwrite_moves_aside_then_commits_or_restores(tmp_path, capsys):
    out = str(tmp_path / "run")
    parser = parser_of("evaluate")
    rundir.prepare_run_dir(out, vars(cli.parse_args(parser, ["--out", out])), done_file="metrics.json")
    rundir.atomic_write_text(os.path.join(out, "metrics.json"), "{}")
    before = digest(out)
    redo = cli.parse_args(parser, ["--out", out, "--lr", "0.5", "--overwrite"])
    assert rundir.prepare_run_dir(out, vars(redo), done_file="metrics.json") is False
    assert "metrics.json" not in os.listdir(out)       # the old result is out of the way at once ...
    rundir.finish_overwrite(ok=False)                  # ... and back when the new run fails
    assert digest(out) == before
    rundir.prepare_run_dir(out, vars(redo), done_file="metrics.json")
    rundir.save_checkpoint({"epoch": 1}, os.path.join(out, "checkpoint_seed0.pt"))  # the new run has started
    assert not [n for n in os.listdir(out) if n.startswith(".old-")] and "metrics.json" not in os.listdir(out)
    # a process killed between the two leaves .old-*: the next run puts the old run back first
    os.remove(os.path.join(out, "checkpoint_seed0.pt"))  # between the two: before the new run's first checkpoint
    os.rename(os.path.join(out, "args.yaml"), os.path.join(out, "new-args.yaml"))
    os.mkdir(os.path.join(out, ".old-x"))
    os.rename(os.path.join(out, "new-args.yaml"), os.path.join(out, ".old-x", "args.yaml"))
    again = cli.parse_args(parser, ["--out", out, "--lr", "0.5"])
    assert rundir.prepare_run_dir(out, vars(again), done_file="metrics.json") is True
    assert sorted(os.listdir(out)) == [".lock", "args.yaml"]


# ---------------------------------------------------------------- signals and the lock, with real processes
def wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.parametrize("signum, code, lock_and_resume", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_is_one_line_the_lock_refuses_a_second_run_and_the_same_command_resumes(
        real_root, tmp_path, capsys, monkeypatch, signum, code, lock_and_resume):
    """The signal in a real process; the second run and the resumed one in this process (the same main())."""
    out = tmp_path / "run"
    command = [RUN.script, "--data", "breastmnist", "--data-root", real_root, "--epochs", "2", "--max-steps", "3",
               "--batch-size", "4", "--save-every", "1", *RUN.smoke_flags, "--out", str(out)]
    env = {**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # SIGINT back to its default in the child: a suite started in the background (`pytest &`) ignores it,
    # the child would inherit that, and Python then installs no Ctrl-C handler (as for `nohup ... &`)
    first = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(out / "checkpoint.pt", first)
    first.send_signal(signal.SIGSTOP)  # holds its lock while stopped
    try:
        if lock_and_resume:
            line = one_line(capsys, lambda: run_main(monkeypatch, *command))
            assert f"is in use by another run (PID {first.pid})" in line, line
    finally:
        first.send_signal(signum)
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    lines = stderr_lines(err)
    assert first.returncode == code and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("interrupted at epoch ") and f"the checkpoint in {out} is kept" in lines[0], lines
    assert lines[0].endswith("run the same command again to resume")
    if not lock_and_resume:
        return
    # the killed run's lock file is still there, with its PID, and does not block the same command
    assert (out / ".lock").read_text().strip() == str(first.pid)
    capsys.readouterr()
    run_main(monkeypatch, *command)
    assert "resuming" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_interrupt_before_any_checkpoint_says_nothing_was_kept(capsys, tmp_path):
    # Python's Ctrl-C handler, which a suite started in the background (SIGINT ignored) lacks
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def main():
        errors.progress.update(out=str(tmp_path), epoch=0, step=3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    line = one_line(capsys, main, code=143)
    assert line == f"interrupted at epoch 0, step 3; no checkpoint was written yet, so nothing of this run is " \
                   f"kept in {tmp_path}"
    errors.progress.reset()
    try:
        assert one_line(capsys, lambda: os.kill(os.getpid(), signal.SIGINT), code=130).startswith("interrupted before")
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- what a kill leaves behind
def _run_checkpoint(epoch):
    gen = torch.Generator().manual_seed(0)
    return rundir.run_state({}, gen, epoch=epoch, step=3 * epoch, meta={"format": "medssl"})


@pytest.mark.parametrize("script", PRETRAINING)
def test_resume_cuts_the_log_back_and_names_what_is_broken(capsys, tmp_path, script):
    out = tmp_path / "run"
    args = cli.parse_args(parser_of(script), ["--out", str(out), "--epochs", "5"])
    assert rundir.open_run(str(out), vars(args)) is None
    rundir.save_checkpoint(_run_checkpoint(2), str(out / "checkpoint.pt"))
    log = out / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in range(3)) + '{"epoch": 3, "lo')
    assert rundir.open_run(str(out), vars(args))["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]  # epoch 2 is redone

    log.write_text('{"epoch": 0}\n{"epo\n{"epoch": 1}\n')
    before = digest(out)
    assert f"{log} line 2 is not JSON" in one_line(capsys, lambda: rundir.open_run(str(out), vars(args)))
    (out / "args.yaml").write_text("epochs: [5\n")
    line = one_line(capsys, lambda: rundir.open_run(str(out), vars(args)))
    assert "args.yaml is unreadable or corrupt" in line and "--overwrite" in line
    (out / "args.yaml").write_text("")
    assert "args.yaml is unreadable or corrupt" in one_line(capsys, lambda: rundir.open_run(str(out), vars(args)))
    before["args.yaml"] = digest(out)["args.yaml"]
    assert digest(out) == before


@pytest.mark.parametrize("content, needle", [
    ({"epoch": 1, "weights": torch.ones(2)}, "is not a checkpoint of a MedSSL training run"),
    ("folder", "is a folder, not a checkpoint file"),
])
def test_a_checkpoint_that_is_not_ours_is_named(capsys, tmp_path, content, needle):
    out = tmp_path / "run"
    args = cli.parse_args(parser_of(RUN.script.removesuffix(".py")), ["--out", str(out)])
    rundir.open_run(str(out), vars(args))
    if content == "folder":
        (out / "checkpoint.pt").mkdir()
    else:
        rundir.save_checkpoint(content, str(out / "checkpoint.pt"))
    before = digest(out)
    assert needle in one_line(capsys, lambda: rundir.open_run(str(out), vars(args)))
    assert digest(out) == before


# ---------------------------------------------------------------- broken model files
class Payload:
    def __reduce__(self):
        return (os.system, ("touch payload-ran",))


def test_broken_checkpoints_get_the_right_words(capsys, tmp_path):
    path = tmp_path / "checkpoint.pt"
    encoder = models.build_encoder("resnet18", "small", 3)
    rundir.save_checkpoint({"encoder": encoder.state_dict(),
                            "meta": {"format": "medssl", "arch": "resnet18", "stem": "small", "in_chans": 3}}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    line = one_line(capsys, lambda: rundir.load_checkpoint(str(path)))
    assert line == f"error: {path} is truncated or corrupt (not a complete PyTorch file); copy it again, or use " \
                   f"another checkpoint"
    torch.save({"x": Payload()}, tmp_path / "payload.pt")
    line = one_line(capsys, lambda: rundir.load_checkpoint(str(tmp_path / "payload.pt")))
    assert "holds pickled Python objects" in line and "posix.system" in line and "it was not run" in line
    assert not os.path.exists("payload-ran")
    state = encoder.state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    rundir.save_checkpoint({"encoder": state, "meta": {"format": "medssl", "arch": "resnet18", "stem": "small",
                                                       "in_chans": 3}}, str(tmp_path / "nan.pt"))
    line = one_line(capsys, lambda: models.load_encoder(str(tmp_path / "nan.pt"), "resnet18", "small", 3))
    assert f"{tmp_path / 'nan.pt'} holds non-finite weights" in line and "layer2.0.conv1.weight" in line


@pytest.fixture(scope="module")
def tiny_beit_folder(tmp_path_factory):
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor
    folder = tmp_path_factory.mktemp("beit") / "tiny"
    torch.manual_seed(0)
    BeitForImageClassification(BeitConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                          num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, needle", [
    ("no config", "has no config.json, so it is no model saved with save_pretrained"),
    ("truncated", "model.safetensors is truncated or corrupt"),
    ("payload", "pytorch_model.bin: it holds pickled Python objects"),
    ("not beit", "holds a 'vit' model, not a BEiT"),
])
def test_broken_beit_folders_are_one_line_never_another_model(capsys, tmp_path, tiny_beit_folder, damage, needle):
    import finetune_beit
    folder = tmp_path / "beit"
    shutil.copytree(tiny_beit_folder, folder)
    weights = folder / "model.safetensors"
    if damage == "no config":
        (folder / "config.json").unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "payload":
        from safetensors.torch import load_file
        torch.save({**load_file(weights), "x": Payload()}, folder / "pytorch_model.bin")
        weights.unlink()
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    before = digest(folder)
    assert needle in one_line(capsys, lambda: finetune_beit.load_model(str(folder), 1))
    if damage in ("no config", "not beit"):
        assert needle in one_line(capsys, lambda: finetune_beit.load_processor(str(folder)))
    assert digest(folder) == before and not os.path.exists("payload-ran")
    assert finetune_beit.load_model(str(tiny_beit_folder), 1).config.hidden_size == 32  # the intact one loads


# ---------------------------------------------------------------- accelerator-facing state
def test_checkpoints_hold_the_training_devices_state_alone_and_other_devices_are_refused(capsys, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = rundir.rng_state(gen)
    assert state["device"] == "cpu" and state["cuda"] == []  # no GPU's stream in a CPU run, GPUs or not
    rundir.save_checkpoint({"epoch": 1, "w": torch.ones(2)}, str(tmp_path / "c.pt"))
    assert torch.load(tmp_path / "c.pt", weights_only=True, map_location=None)["w"].device.type == "cpu"
    on_gpu = {**state, "device": "cuda", "augment": torch.zeros(16, dtype=torch.uint8)}
    line = one_line(capsys, lambda: rundir.restore_run({"rng": on_gpu}, {}, gen))
    assert "written by a run on cuda and this one runs on cpu" in line and "--device cuda" in line


def test_local_rank_beyond_the_visible_gpus_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = one_line(capsys, lambda: dist.init_distributed(torch.device("cuda")))
    assert "LOCAL_RANK 3 but torch sees 2 CUDA GPU(s)" in line and "--nproc_per_node=2" in line
