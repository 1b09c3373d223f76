"""The benchmarks run end to end at their tiniest settings (1 step, batch 4, 28 px) and write finite,
positive figures for every configuration asked for, and the resources study's two PNGs.

Both benchmarks start at once: most of each one's time is the one-off import of torch, torchvision
and the scripts (~6 s of CPU), which the two can do side by side on two cores."""
import json
import math
import os
import subprocess
import sys

from conftest import REPO

WORKLOADS = ("byol", "barlow", "simclr", "features", "finetune")


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
    speed = start("benchmarks/bench_speed.py", "--workloads", ",".join(WORKLOADS), "--sizes", "28",
                  "--variants", "cpu+cl,cuda+bf16", "--batch", "4", "--steps", "1", "--warmup", "0",
                  "--out", str(speed_json))
    resources = start("benchmarks/bench_resources.py", "--resolutions", "28", "--batch-sizes", "4", "--steps", "1",
                      "--warmup", "0", "--variant", "cpu+cl", "--out", str(resources_dir))
    speed_out, resources_out = finish(speed), finish(resources)

    report = json.loads(speed_json.read_text())
    rows = {(r["workload"], r["size"], r["variant"]): r for r in report["results"]}
    assert set(rows) >= {(w, 28, "cpu+cl") for w in WORKLOADS}
    for key, r in rows.items():
        for field in ("images_per_sec", "sec_per_step", "peak_memory_mib"):
            assert positive(r[field]), (key, field, r[field])
        assert math.isfinite(r["loss"]) and "CPU peak RSS growth" in r["memory_measure"]
    assert "| byol | 28 | 4 | cpu+cl |" in speed_out                     # the Markdown table
    assert "ChestMNIST 28 px BYOL epoch (78,468 images" in speed_out      # the GPU goal's projection
    if not any(r["variant"].startswith("cuda") for r in report["results"]):
        assert "cuda+bf16: not run: no CUDA" in speed_out

    grid = json.loads((resources_dir / "resources.json").read_text())
    (cell,) = grid["results"]
    assert (cell["size"], cell["batch"], cell["workload"]) == (28, 4, "barlow")
    for field in ("epoch_seconds", "peak_memory_mib", "sec_per_step"):
        assert positive(cell[field]), (field, cell[field])
    assert cell["steps_per_epoch"] == 21_165 // 4
    for name in ("epoch_time.png", "peak_memory.png"):
        assert (resources_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 28 |" in resources_out
