"""--logger: what Weights & Biases (offline), MLflow (a file store in the run directory) and TensorBoard
hold after a pretraining run, read back with each tracker's own reader, equals log.jsonl; a run stopped
by preemption and resumed continues the same W&B and MLflow runs; a missing tracker package is one line."""
import glob
import importlib
import json
import os
import signal
import struct
import sys

import pytest

from common import cli, errors, loggers, preemption

pytestmark = pytest.mark.usefixtures("fresh_state")


@pytest.fixture(autouse=True)
def usr1_handler():
    """cli.run_main, run in this process, installs a SIGUSR1 handler: put the previous one back."""
    handler = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, handler)

SCRIPT = "pretrain_simclr.py"
SMOKE = ["--projector-hidden", "32", "--projector-out", "16", "--aug", "simclr"]


def run_main(monkeypatch, script, *args):
    """`python <script> args` in this process: its main() under cli.run_main, as the script's end does."""
    monkeypatch.setattr("sys.argv", [script, *map(str, args)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    cli.run_main(importlib.import_module(script.removesuffix(".py")).main)


def wandb_files(folder):
    """The .wandb files of the W&B runs in `folder` (its latest-run link aside), oldest first."""
    return sorted(path for path in glob.glob(os.path.join(folder, "*", "run-*.wandb"))
                  if not os.path.islink(os.path.dirname(path)))


def wandb_history(folder):
    """The history rows of the W&B runs in `folder`, oldest run first, read from their .wandb files (W&B's
    record log: LevelDB's log format of 32 KiB blocks, each record a 7-byte header, then a W&B Record
    protobuf)."""
    from wandb.proto import wandb_internal_pb2
    rows = []
    for path in wandb_files(folder):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B", path
        pos, payload = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            payload += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                payload = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its settings and caches in tmp_path; MLflow's store the run directory's."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RANK", "SLURM_JOB_ID",
                 "MLFLOW_ALLOW_FILE_STORE"):  # the last set by loggers, and unset again after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_trackers_hold_the_log_and_a_preempted_run_continues_the_same_runs(real_root, tmp_path, monkeypatch, offline,
                                                                           capsys):
    out = tmp_path / "run"
    command = [SCRIPT, "--data", "breastmnist", "--data-root", real_root, "--epochs", "2", "--max-steps", "3",
               "--batch-size", "8", "--device", "cpu", *SMOKE, "--out", str(out)]
    # the first launch is preempted after step 2 (as SIGUSR1 would be): it checkpoints and exits
    requested = preemption.requested
    monkeypatch.setattr(preemption, "requested",
                        lambda device=None: signal.SIGUSR1 if errors.progress.step == 2 else None)
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, *command, "--logger", "wandb", "mlflow")
    assert stopped.value.code == preemption.EXIT_PREEMPTED
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped by SIGUSR1 at epoch 0, step 2;")
    ids = json.loads((out / "trackers.json").read_text())

    # the second launch, with another set of trackers (a logger flag keeps the run), resumes and finishes
    monkeypatch.setattr(preemption, "requested", requested)
    run_main(monkeypatch, *command, "--logger", "mlflow", "wandb", "--tensorboard")
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same W&B and MLflow runs
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log]
    assert [record["epoch"] for record in log] == [0, 1]

    # MLflow: one run, FINISHED, its metric histories those of log.jsonl, its params the flags
    from mlflow.tracking import MlflowClient
    client = MlflowClient(loggers.mlflow_uri(str(out)))
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["batch_size"] == "8" and run.data.params["aug"] == "simclr"
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "epoch/loss"))
    assert history == list(enumerate(losses))
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "epoch/lr"))
    assert lrs == [(record["epoch"], record["lr"]) for record in log]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "step/loss")] == [1, 4]  # i % 10 == 0

    # W&B: two offline runs (the preempted one and its continuation) under one id, in <out>/wandb
    assert [os.path.basename(path) for path in wandb_files(out / "wandb")] == [f"run-{ids['wandb']}.wandb"] * 2
    rows = wandb_history(str(out / "wandb"))
    epochs = [(row["epoch"], row["epoch/loss"]) for row in rows if "epoch/loss" in row]
    assert epochs == list(enumerate(losses))
    assert sorted(row["step"] for row in rows if "step/loss" in row) == [1, 4]

    # TensorBoard (the second launch only): the epoch records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("epoch/loss")
    assert [e.step for e in scalars] == [0, 1] and [e.value for e in scalars] == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_is_one_line_before_the_run_directory(name, package, tmp_path, monkeypatch, capsys):
    import pretrain_simclr
    monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: its import fails
    out = tmp_path / "run"

    def main():
        cli.parse_args(pretrain_simclr.get_args_parser(), ["--logger", name, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --logger {name} needs the package {package}")
    assert lines[0].endswith(f"pip install {package}, or run without --logger {name}") and not out.exists()


def test_tensorboard_flag_is_logger_tensorboard_and_logger_flags_keep_the_run():
    import pretrain_simclr
    from common import rundir
    parse = lambda *argv: cli.parse_args(pretrain_simclr.get_args_parser(), list(argv)).logger  # noqa: E731
    assert parse("--tensorboard") == parse("--logger", "tensorboard") == ["tensorboard"]
    assert parse("--logger", "tensorboard", "wandb", "--tensorboard") == ["tensorboard", "wandb"]
    assert parse() == [] and loggers.chosen(["mlflow"], True) == ["mlflow", "tensorboard"]
    assert {"logger", "tensorboard"} <= rundir._RELAUNCH_FLAGS
    with pytest.raises(SystemExit):
        parse("--logger", "comet")
