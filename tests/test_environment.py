"""Faults of the environment, one test per family, through the shared code every script runs
(cli.run_main, cli.parse_args, dist.on_main, the TensorBoard writers, convert_images' pool): each
ends in one line naming the fix, exit code 2 (or the signal's), no traceback, and nothing already
written changed. In this process where the shared function shows it; a few real processes where
only a process can (signals to a process group, torchrun, a missing package, stdout's encoding)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from common import cli, errors, loggers
from conftest import REPO, cli_env, digest, run_cli

TQDM_OR_TORCHRUN = ("epoch ", "W1", "E1", "I1")  # a progress bar; torchrun's own log lines


def lines_of(err):
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def one_line(capsys, main, code=2):
    """Run main() as a script's cli.run_main(main); check the exit code and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    err = capsys.readouterr().err
    lines = lines_of(err)
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, (e.value.code, err)
    return lines[0]


pytestmark = pytest.mark.usefixtures("fresh_state")


# ---------------------------------------------------------------- OS errors: the last line of defence
@pytest.mark.parametrize("fault, needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/log.jsonl"),
     ["/data/run/log.jsonl: No space left on device", "free some space"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), ["/ro/out: Read-only file system", "writable"]),
    (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), ["File name too long", "shorter"]),
    (OSError(errno.EACCES, "Permission denied", b"/tmp/\xff\xfe"), ["/tmp/\\udcff\\udcfe: Permission denied"]),
    (ModuleNotFoundError("No module named 'umap'", name="umap"), ["pip install umap-learn"]),
])
def test_an_uncaught_os_error_or_missing_package_is_one_line_and_what_is_kept(capsys, tmp_path, fault, needles):
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    before = digest(tmp_path)

    def main():
        errors.progress.update(out=str(tmp_path), epoch=2, step=7)
        raise fault
    line = one_line(capsys, main)
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, line
    if isinstance(fault, OSError):
        assert f"the checkpoint in {tmp_path} is kept" in line and "run the same command again" in line
    assert digest(tmp_path) == before


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(ZeroDivisionError):
        cli.run_main(lambda: 1 / 0)
    with pytest.raises(ModuleNotFoundError):  # a module of this repository missing is a bug, not a package
        cli.run_main(lambda: __import__("common.nonexistent_module"))


def test_paths_with_undecodable_bytes_print_under_the_c_locale():
    code = "from common import cli; cli.run_main(lambda: print('wrote', '/tmp/\\udcff-\\u00e9/metrics.json'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=cli_env(LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and r.stdout.strip() == "wrote /tmp/\\udcff-\\xe9/metrics.json", r.stderr[-2000:]


# ---------------------------------------------------------------- configs: billion laughs and sizes
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "epochs: *i\n"


@pytest.mark.parametrize("text, needle", [
    (LAUGHS, "uses a YAML alias (*a)"),                       # 9**9 strings if expanded
    ("out: &o runs/x\ndata: *o\n", "uses a YAML alias (*o)"),  # any alias: a config of flags needs none
    ("data: " + "x" * 5000 + "\n", "data is 5000 characters long"),
    ("crop_scale: [" + ", ".join(["0.5"] * 2000) + "]\n", "crop_scale has 2000 values"),
    ("# padding\n" * 40000, "is over 256 KiB"),
])
def test_configs_that_expand_or_are_huge_are_refused_fast(capsys, tmp_path, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    parser = cli.add_common_flags(cli.argparse.ArgumentParser())
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--crop-scale", type=float, nargs=2)
    start = time.time()
    line = one_line(capsys, lambda: cli.parse_args(parser, ["--config", str(config)]))
    assert time.time() - start < 2 and line.startswith(f"error: config {config}") and needle in line, line
    assert os.listdir(tmp_path) == ["c.yaml"]


# ---------------------------------------------------------------- optional packages: TensorBoard
SHIM = """import importlib.abc, sys
class NoTensorBoard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTensorBoard())
"""


def test_tensorboard_absent_is_one_line_before_the_run_directory(capsys, tmp_path, monkeypatch, real_root):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM)
    out = tmp_path / "run"
    r = run_cli("evaluate.py", "--mode", "knn", "--data", "breastmnist", "--tensorboard", "--out", str(out),
                env={"MEDMNIST_ROOT": real_root, "PYTHONPATH": str(tmp_path / "shim")})
    lines = lines_of(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--tensorboard needs the package tensorboard" in lines[0] and "pip install tensorboard" in lines[0]
    assert not out.exists()
    # the trackers' opener says the same, for a caller that skipped parse_args
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules: ImportError
    assert "pip install tensorboard" in one_line(capsys, lambda: loggers.open_trackers(["tensorboard"], str(out), {}))
    assert loggers.open_trackers([], str(out), {}) == [] and not out.exists()


# ---------------------------------------------------------------- signals while a folder converts
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_as_a_folder_converts_is_one_line_and_leaves_no_worker(
        tmp_path, signum, code):
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(300):  # more than convert_images does in-process (2 chunks of 64)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "run"
    command = [sys.executable, "pretrain_byol.py", "--data", str(tmp_path / "images"), "--epochs", "1",
               "--max-steps", "1", "--batch-size", "4", "--projector-hidden", "16", "--predictor-hidden", "16",
               "--projector-out", "8", "--out", str(out)]
    # its own process group, as a terminal's foreground job: Ctrl-C reaches the workers too
    p = subprocess.Popen(command, cwd=REPO, env=cli_env(MEDSSL_CACHE=str(tmp_path / "cache")), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: (os.setsid(), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    for line in p.stdout:
        if line.startswith("data: converting"):
            os.killpg(p.pid, signum)  # as the pool's workers start
            break
    _, err = p.communicate(timeout=120)
    lines = [line for line in lines_of(err) if not line.startswith(TQDM_OR_TORCHRUN)]
    assert p.returncode == code and len(lines) == 1 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert lines[0] == "interrupted before the run directory was set up; nothing was written"
    assert not out.exists() and not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".npz")]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # no worker outlived it
        os.killpg(p.pid, 0)


# ---------------------------------------------------------------- torchrun: once per run, code 2 on every rank
def test_torchrun_errors_print_once_and_every_rank_exits_2(real_root, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "pretrain_byol.py", "--data", "breastmnist", "--data-root", real_root, "--epochs", "1",
                        "--max-steps", "1", "--batch-size", "5", "--out", str(out)],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    ours = [line for line in lines_of(r.stderr) if line.startswith("error:")]
    assert ours == ["error: --batch-size 5 is the global batch and must split evenly over the 2 torchrun "
                    "processes"], r.stderr[-3000:]
    # torchrun's report: the first rank out exited 2; the other did the same, or torchrun stopped it (143;
    # -15 when its SIGTERM came before the rank, still importing, had installed its handler)
    codes = re.findall(r"exitcode  : (-?\d+)", r.stderr)
    assert r.returncode != 0 and codes and set(codes) <= {"2", "143", "-15"} and "2" in codes, r.stderr[-3000:]
    assert not [line for line in lines_of(r.stderr) if line.startswith(("interrupted", "RuntimeError"))]


def test_a_dead_peer_is_one_line_saying_what_is_kept(capsys, tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    import torch.distributed  # cli imports it only where a process group may be up
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)

    def main():
        errors.progress.update(out=str(tmp_path), epoch=1, step=12)
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:15765: Connection reset by "
                           "peer. This is typically caused by a remote worker hanging\nor bugs")
    line = one_line(capsys, main)
    assert line.startswith("error: another torchrun process stopped (") and "Connection reset by peer" in line
    assert line.endswith(f"this one stopped at epoch 1, step 12; the checkpoint in {tmp_path} is kept; run the same "
                         f"command again to resume"), line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the ranks another rank speaks for exit 2 in silence
        cli.run_main(lambda: (_ for _ in ()).throw(errors.ReportedElsewhere("rank 0 failed")))
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_the_first_rank_to_report_prints_and_the_others_do_not(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-1")
    monkeypatch.setenv("RANK", "1")
    assert cli.reports_here() is True       # rank 1 got there first
    monkeypatch.setenv("RANK", "0")
    assert cli.reports_here() is False      # rank 0 then stays silent
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-2")
    assert cli.reports_here() is True       # another torchrun run reports afresh
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # RANK set by hand: rank 0 reports interrupts, each rank its errors
    assert cli.reports_here(interrupt=True) is True
    monkeypatch.setenv("RANK", "1")
    assert cli.reports_here(interrupt=True) is False and cli.reports_here() is True


# ---------------------------------------------------------------- the result scripts
def _metrics(folder, data_hash, data="breastmnist"):
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "data": data, "data_hash": data_hash, "mode": "knn", "encoder": None, "n": 1,
        "mean": {"auc": 0.8, "acc": 0.7}, "std": {"auc": 0.0, "acc": 0.0}}))
    return str(folder / "metrics.json")


def _script(name, argv, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return module.main


def test_result_scripts_refuse_mixed_data_and_bad_paths_in_one_line(capsys, tmp_path, monkeypatch):
    a, b = _metrics(tmp_path / "a", "1" * 64), _metrics(tmp_path / "b", "2" * 64)
    before = digest(tmp_path)
    line = one_line(capsys, _script("table", [a, b], monkeypatch))
    assert f"{a} and {b} both name breastmnist but scored different data" in line and "--mixed-data" in line
    capsys.readouterr()
    _script("table", [a, b, "--mixed-data"], monkeypatch)()
    rows = capsys.readouterr().out.splitlines()
    assert "data hash" in rows[0] and "| 111111111111 |" in rows[2] and "| 222222222222 |" in rows[3]
    assert "No such file" in one_line(capsys, _script("table", [str(tmp_path / "none.json")], monkeypatch))
    run = tmp_path / "a"
    for argv, needle in [([str(tmp_path / "missing")], "is not a run directory (it does not exist)"),
                         ([str(run), "--table", str(tmp_path / "no" / "t.md")], "does not exist; create it"),
                         ([str(run), "--table", str(tmp_path)], "is a folder"),
                         ([str(run), "--bogus"], "unrecognized arguments: --bogus")]:
        assert needle in one_line(capsys, _script("select_recipe", argv, monkeypatch))
    assert digest(tmp_path) == before
