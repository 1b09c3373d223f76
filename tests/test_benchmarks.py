"""The benchmarks run end to end at their tiniest settings (1 step, batch 4, 28 px) and write finite,
positive figures for every configuration asked for, and the resources study's two PNGs. bench_speed's
default workloads are every pretraining method of common/methods.py (each at its smoke flags, through
--method-flags) plus features and finetune; the resources study takes any method of the list.

Both benchmarks start at once: most of each one's time is the one-off import of torch, torchvision
and the scripts (~6 s of CPU), which the two can do side by side on two cores."""
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from common import methods


def start(*args):
    env = {**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmarks_write_finite_figures_and_plots(tmp_path):
    speed_json, resources_dir = tmp_path / "speed.json", tmp_path / "resources"
    every = methods.all_methods()
    smoke = [f for m in every for f in ("--method-flags", f"{m.name}:{shlex.join(m.smoke_flags)}")]
    speed = start("benchmarks/bench_speed.py", "--sizes", "28", "--variants", "cpu+cl,cuda+bf16", "--batch", "4",
                  "--steps", "1", "--warmup", "0", *smoke, "--out", str(speed_json))
    # the resources study on the list's last method (not its default, Barlow Twins): any method works
    other = every[-1]
    resources = start("benchmarks/bench_resources.py", "--method", other.name, "--method-flags",
                      shlex.join(other.smoke_flags), "--resolutions", "28", "--batch-sizes", "4", "--steps", "1",
                      "--warmup", "0", "--variant", "cpu+cl", "--out", str(resources_dir))
    speed_out, resources_out = finish(speed), finish(resources)

    report = json.loads(speed_json.read_text())
    rows = {(r["workload"], r["size"], r["variant"]): r for r in report["results"]}
    workloads = [m.name for m in every] + ["features", "finetune"]
    assert set(rows) >= {(w, 28, "cpu+cl") for w in workloads}
    for key, r in rows.items():
        for field in ("images_per_sec", "sec_per_step", "peak_memory_mib"):
            assert positive(r[field]), (key, field, r[field])
        assert math.isfinite(r["loss"]) and "CPU peak RSS growth" in r["memory_measure"]
    for m in every:  # each method ran with the flags given to it, and only those
        assert rows[(m.name, 28, "cpu+cl")]["flags"] == list(m.smoke_flags)
    assert "| byol | 28 | 4 | cpu+cl |" in speed_out                     # the Markdown table
    assert "ChestMNIST 28 px BYOL epoch (78,468 images" in speed_out      # the GPU goal's projection
    if not any(r["variant"].startswith("cuda") for r in report["results"]):
        assert "cuda+bf16: not run: no CUDA" in speed_out

    grid = json.loads((resources_dir / "resources.json").read_text())
    (cell,) = grid["results"]
    assert (cell["size"], cell["batch"], cell["workload"]) == (28, 4, other.name)
    for field in ("epoch_seconds", "peak_memory_mib", "sec_per_step"):
        assert positive(cell[field]), (field, cell[field])
    assert cell["steps_per_epoch"] == 21_165 // 4
    for name in ("epoch_time.png", "peak_memory.png"):
        assert (resources_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{other.label}, resnet18" in resources_out and "| 28 |" in resources_out


def test_a_method_refusing_a_flag_is_named_before_anything_is_built():
    """A flag the method's script does not take (or a bad value) raises, naming the script and the flag,
    rather than exiting the measuring process without a word."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_speed
    import torch
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    name = methods.names()[0]
    with pytest.raises(bench_speed.FlagError, match=f"pretrain_{name}.py has no flag --no-such-flag"):
        bench_speed.method_step(name, ["--batch-size", 4, "--no-such-flag", 1], torch.device("cpu"), images)
    with pytest.raises(bench_speed.FlagError, match=f"pretrain_{name}.py refuses .*--batch-size four"):
        bench_speed.method_step(name, ["--batch-size", "four"], torch.device("cpu"), images)


def test_dino_and_mae_steps_beside_lightlys_blocks_on_heads_of_the_same_size(tmp_path):
    """bench_lightly_methods.py at its tiniest (bf16, so that lightly's side runs under MedSSL's autocast and
    layout): a row for every configuration and side with positive images/s and a finite loss, the MedSSL /
    lightly ratio of each pair, and lightly's DINO head and MAE decoder as large as MedSSL's (like for like)."""
    out = tmp_path / "methods.json"
    text = finish(start("benchmarks/bench_lightly_methods.py", "--sizes", "28", "--batch-size", "4", "--images", "8",
                        "--steps", "1", "--warmup", "0", "--repeats", "1", "--workers", "0", "--precision", "bf16",
                        "--vit", "test_vit", "--local-crops", "2", "--out-dim", "64", "--head-hidden", "32",
                        "--head-bottleneck", "16", "--decoder-depth", "1", "--decoder-width", "32",
                        "--decoder-heads", "2", "--out", str(out)))
    rows = {(r["method"], r["arch"], r["side"]): r for r in json.loads(out.read_text())["rows"]}
    pairs = [("dino", "resnet18"), ("dino", "test_vit"), ("mae", "test_vit")]
    assert set(rows) == {("byol", "resnet18", "medssl")} | {(*p, side) for p in pairs for side in ("medssl", "lightly")}
    for key, r in rows.items():
        assert positive(r["images_per_sec"]) and math.isfinite(r["last_loss"]) and r["size"] == 28, key
        assert r["precision"].startswith("bf16"), key
    for pair in pairs:
        ours, theirs = rows[(*pair, "medssl")], rows[(*pair, "lightly")]
        assert ours["ratio_medssl_lightly"] == pytest.approx(ours["images_per_sec"] / theirs["images_per_sec"])
        assert f"| {pair[0]} | {pair[1]} | medssl | 28 | {ours['precision']} |" in text
    for arch in ("resnet18", "test_vit"):  # the weight-normalised last layer's norms (out-dim of them) do not train
        ours, theirs = rows[("dino", arch, "medssl")], rows[("dino", arch, "lightly")]
        assert ours["head_params"] == theirs["head_params"]
        assert ours["head_trainable"] == theirs["head_trainable"] == ours["head_params"] - 64
    ours, theirs = rows[("mae", "test_vit", "medssl")], rows[("mae", "test_vit", "lightly")]
    assert ours["decoder_trainable"] == theirs["decoder_trainable"]
