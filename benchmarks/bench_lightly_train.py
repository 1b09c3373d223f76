"""MedSSL's SimCLR pretraining against lightly-train's (Lightly's pretraining framework) on the same images and
machine: steady images/s and peak memory of each, interleaved in one run, with their ratios.

    python benchmarks/bench_lightly_train.py                                  # 28, 64, 128 px, 2 runs each
    python benchmarks/bench_lightly_train.py --sizes 64 --steps 6 --runs 1 --out results/lt/lt.json

Both sides train SimCLR on a ResNet-18 (imagenet stem, 3 input channels: gray images repeated), batch
128, AdamW at lr 1e-3, with random resized crops of 0.08-1 of the area and the Gaussian blur's sigma
(SimCLR's 0.1-2.0 px at 224 px) scaled to the image side. Configurations (--configs):
  - medssl: pretrain_simclr.py's own step (bench_speed.method_step: the script's build(args, run) on an
    in-memory run) with --optimizer adamw --lr 1e-3 --batch-size 128 --aug simclr --precision auto, the
    script's defaults otherwise. Views are drawn in the training process from the uint8 images it holds.
  - medssl-fp32: the same with --precision fp32.
  - lightly-train-fp32 / lightly-train-bf16: lightly_train.pretrain(method="simclr",
    model="torchvision/resnet18", precision "32-true" / "bf16-mixed", batch_size 128, num_workers 1,
    optim "adamw", optim_args lr 1e-3) on a folder of the same images as PNGs, its defaults otherwise
    (SimCLR head 2048-128, colour jitter, grayscale, blur; loggers and checkpoint callbacks). Its
    transform gets image_size = the side and the scaled blur; where MedSSL's blur is off (below 38 px,
    common/augment.py's blur_is_off) lightly-train's is off too. trainer_args max_steps and
    log_every_n_steps=1, so that its metrics.jsonl holds each step's profiling/batch_time and
    profiling/data_time (the wait for the loader): a step's time is their sum.
  - medssl-byol / lightly-byol (not in the default set): the BYOL pair of benchmarks/bench_lightly.py,
    pretrain_byol.py's step (--precision auto) against lightly's library recipe (BYOLTransform in a
    DataLoader, float32 on the CPU, Adam 1e-4), at batch 128 with 1 loader worker.

The images are PneumoniaMNIST's train images ($MEDMNIST_ROOT, --data), upsampled (bicubic) to each side,
(--warmup + --steps) x 128 of them, so that lightly-train's one epoch holds every step; --data random
draws uint8 noise instead. Every configuration runs in a fresh Python process, and the order interleaves
them: for each side, --runs rounds of every configuration in turn (A B C D A B C D), so that a change in
the machine's load falls on all of them alike. Figures of one run:
  - images/s: source images per second over the timed steps (a step on B images makes 2B views), after
    --warmup untimed steps (start-up, first allocations, the loader's first batches): B x steps / their
    summed seconds.
  - peak RSS: the training process's RSS high-water mark (VmHWM) over its life, imports included.
  - + loader workers: the largest sum, sampled every 0.5 s, of the private memory (USS) of its child
    processes (lightly's loader worker): what they hold beyond the pages they share with it. "Peak
    memory" in the ratios is the two added.
  - loader worker, cores: the worker's CPU seconds per batch over the mean step time: the share of a
    core it kept busy besides the training process's --threads.
A configuration's figure is the mean of its runs. Ratios: MedSSL's default against lightly-train's faster
precision at that side, and against MedSSL --precision fp32.

Needs `pip install -r benchmarks/requirements.txt` (lightly-train, lightly). Threads: torch's default
(OMP_NUM_THREADS) or --threads, the same for every configuration; lightly-train's loader worker is a
process of its own on top."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CONFIGS = {
    "medssl": "MedSSL, --precision auto (default)",
    "medssl-fp32": "MedSSL, --precision fp32",
    "lightly-train-fp32": "lightly-train, 32-true",
    "lightly-train-bf16": "lightly-train, bf16-mixed",
    "medssl-byol": "MedSSL BYOL (bench_lightly.py)",
    "lightly-byol": "lightly BYOL recipe (bench_lightly.py)",
}
DEFAULT_CONFIGS = "medssl,medssl-fp32,lightly-train-fp32,lightly-train-bf16"
LIGHTLY_TRAIN_PRECISION = {"lightly-train-fp32": "32-true", "lightly-train-bf16": "bf16-mixed"}
DEFAULT_STEPS = "28:12,64:6,128:5"  # a step at 128 px takes 2-9 s on one CPU thread
BLUR_SIGMA_224 = (0.1, 2.0)  # SimCLR's blur sigma in px at 224 px (Chen et al. 2020, App. A)


def get_args_parser():
    parser = argparse.ArgumentParser("bench_lightly_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="28,64,128", help="comma-separated image sides in px (default 28,64,128)")
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help="timed steps per configuration: one number, or SIZE:STEPS pairs (a side not listed "
                             f"takes the nearest listed side's; default {DEFAULT_STEPS}: about 20 min on 2 cores)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first: first allocations, the loader's first batches (default 2)")
    parser.add_argument("--runs", type=int, default=2, help="fresh-process runs of each configuration (default 2)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, any of {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS})")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step on both sides (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate on both sides (default 1e-3)")
    parser.add_argument("--data", default="pneumoniamnist", choices=["pneumoniamnist", "breastmnist", "random"],
                        help="source images: a MedMNIST train split from --data-root, upsampled to each side, or "
                             "uint8 noise (default pneumoniamnist)")
    parser.add_argument("--data-root", default=None, help="folder of <data>.npz (default $MEDMNIST_ROOT)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every configuration (default: torch's: OMP_NUM_THREADS, else the cores)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per configuration (default 900)")
    parser.add_argument("--workdir", default=None,
                        help="keep the PNG folders, lightly-train's run folders and each process's log here "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here, and the tables next to it (.md)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a configuration's own process
    return parser


def steps_per_side(spec, sizes):
    """{side: timed steps} from --steps: one number for every side, or SIZE:STEPS pairs; a side not listed takes
    the steps of the nearest listed one."""
    try:
        if ":" not in spec:
            return {side: int(spec) for side in sizes}
        table = {int(a): int(b) for a, b in (pair.split(":") for pair in spec.split(","))}
    except ValueError:
        sys.exit(f"error: --steps {spec!r}: give a number or SIZE:STEPS pairs, e.g. {DEFAULT_STEPS}")
    return {side: table[min(table, key=lambda listed: abs(listed - side))] for side in sizes}


# ================================================================ the images
def data_path(name, root):
    """The npz of --data (None for random); a one-line exit where it is missing."""
    if name == "random":
        return None
    path = os.path.join(root or os.environ.get("MEDMNIST_ROOT") or "", f"{name}.npz")
    if not os.path.isfile(path):
        sys.exit(f"error: --data {name}: no {path}; point --data-root or $MEDMNIST_ROOT at the folder with "
                 f"{name}.npz, or use --data random")
    return path


def source_images(name, root, n, side):
    """n uint8 (side, side) gray images: a MedMNIST train split (repeated to n) upsampled bicubically, or noise."""
    import numpy as np
    from PIL import Image
    if name == "random":
        return np.random.default_rng(0).integers(0, 256, (n, side, side), dtype=np.uint8)
    with np.load(data_path(name, root)) as npz:
        images = npz["train_images"]
    images = images[np.arange(n) % len(images)]
    if side != images.shape[1]:
        images = np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.Resampling.BICUBIC))
                           for x in images])
    return images


def write_pngs(folder, images):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x).save(os.path.join(folder, f"{i:06d}.png"))


# ================================================================ one configuration (in its own process)
def status_kib(field, pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/{pid}/status")


def scaled_blur(side):
    """lightly-train's gaussian_blur transform args matching MedSSL's SimCLR blur at this side, or None where
    MedSSL's is off."""
    sys.path.insert(0, REPO)
    from common import augment
    if augment.blur_is_off(side, BLUR_SIGMA_224, 224):
        return None
    return {"prob": 0.5, "sigmas": tuple(s * side / 224 for s in BLUR_SIGMA_224), "blur_limit": 0}


def timed_steps(step, warmup, steps):
    """Seconds of each timed step of step() (it returns a loss tensor; float() waits for it)."""
    for _ in range(warmup):
        float(step())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step())
        seconds.append(time.perf_counter() - start)
    return seconds


def run_medssl(cfg):
    import numpy as np
    import torch
    sys.path[:0] = [REPO, HERE]
    import bench_lightly
    import bench_speed
    array = np.load(cfg["images"])
    device = torch.device("cpu")
    if cfg["name"] in ("medssl", "medssl-fp32"):
        precision = "auto" if cfg["name"] == "medssl" else "fp32"
        images = torch.from_numpy(array)[:, None]
        method_step = bench_speed.method_step("simclr", ["--optimizer", "adamw", "--lr", cfg["lr"], "--batch-size",
                                                         cfg["batch_size"], "--aug", "simclr", "--precision",
                                                         precision], device, images)
        chosen = method_step.run.precision
        count = iter(range(10**9))
        seconds = timed_steps(lambda: method_step(next(count)), cfg["warmup"], cfg["steps"])
        return {"step_seconds": seconds, "precision": f"{chosen.name}, "
                f"{'channels_last' if chosen.channels_last else 'contiguous'}", "threads": torch.get_num_threads()}
    args = argparse.Namespace(size=cfg["size"], batch_size=cfg["batch_size"], workers=1)
    if cfg["name"] == "medssl-byol":
        step, precision = bench_lightly.medssl_step_fn(args, device, array), "auto"
    else:
        step, precision = bench_lightly.lightly_step_fn(args, device, array), "fp32"
    return {"step_seconds": timed_steps(step, cfg["warmup"], cfg["steps"]), "precision": precision,
            "threads": torch.get_num_threads()}


def run_lightly_train(cfg):
    import torch

    import lightly_train
    out = os.path.join(cfg["dir"], "lightly_train_out")
    lightly_train.pretrain(
        out=out, data=cfg["folder"], model="torchvision/resnet18", method="simclr", batch_size=cfg["batch_size"],
        num_workers=1, accelerator="cpu", devices=1, precision=LIGHTLY_TRAIN_PRECISION[cfg["name"]], epochs=1,
        optim="adamw", optim_args={"lr": cfg["lr"]}, overwrite=True, seed=0,
        transform_args={"image_size": (cfg["size"], cfg["size"]), "gaussian_blur": scaled_blur(cfg["size"])},
        trainer_args={"max_steps": cfg["warmup"] + cfg["steps"], "log_every_n_steps": 1})
    rows = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "profiling/batch_time" in row:
                rows[row["step"]] = row
    timed = [rows[i] for i in sorted(rows)][cfg["warmup"]:]
    if len(timed) != cfg["steps"]:
        raise RuntimeError(f"lightly-train logged {len(rows)} steps' times, expected {cfg['warmup'] + cfg['steps']}")
    seconds = [r["profiling/batch_time"] + r.get("profiling/data_time", 0.0) for r in timed]
    return {"step_seconds": seconds, "data_wait_fraction": sum(r.get("profiling/data_time", 0.0) for r in timed)
            / sum(seconds), "precision": LIGHTLY_TRAIN_PRECISION[cfg["name"]], "threads": torch.get_num_threads(),
            "lightly_train": lightly_train.__version__}


def child(cfg_path):
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("threads"):
        import torch
        torch.set_num_threads(cfg["threads"])
    result = run_lightly_train(cfg) if cfg["name"] in LIGHTLY_TRAIN_PRECISION else run_medssl(cfg)
    result["peak_rss_mib"] = status_kib("VmHWM") / 1024
    with open(cfg["result"], "w") as f:
        json.dump(result, f)


# ================================================================ parent: a fresh process per configuration
def descendants(pid):
    """Process ids of `pid`'s children, their children, ... (lightly-train's loader worker)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                found += kids
                todo += kids
        except OSError:  # gone meanwhile
            continue
    return found


def private_kib(pid):
    """Memory only this process holds (USS: private clean + dirty pages), KiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return 0


def cpu_seconds(pid):
    """User + system CPU seconds of a live process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    except OSError:
        return None
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def run_one(cfg, timeout):
    """One configuration in a fresh process: its figures, or {"error": ...}. While it runs, a thread samples
    every 0.5 s the private memory (USS) of its child processes, summed, and their CPU time."""
    os.makedirs(cfg["dir"], exist_ok=True)
    cfg_path = os.path.join(cfg["dir"], "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = {**os.environ, "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",  # no usage events sent from a benchmark
           "LIGHTLY_TRAIN_CACHE_DIR": os.path.join(cfg["dir"], "lightly_train_cache")}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(os.path.join(cfg["dir"], "log.txt"), "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", cfg_path], cwd=cfg["dir"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        peak_private, worker_cpu = [0], {}

        def sample():
            while proc.poll() is None:
                kids = descendants(proc.pid)
                peak_private[0] = max(peak_private[0], sum(private_kib(k) for k in kids))
                for k in kids:
                    seconds = cpu_seconds(k)
                    if seconds is not None:
                        worker_cpu[k] = seconds
                time.sleep(0.5)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sampler.join()
    # lightly-train's checkpoints, exported model and file-list cache: ~300 MB a run that nothing here reads
    for folder in ("lightly_train_out/checkpoints", "lightly_train_out/exported_models", "lightly_train_cache"):
        shutil.rmtree(os.path.join(cfg["dir"], folder), ignore_errors=True)
    figures = {"wall_s": time.perf_counter() - start, "load_avg_1min": [round(load_before, 2),
                                                                         round(os.getloadavg()[0], 2)]}
    if proc.returncode != 0 or not os.path.isfile(cfg["result"]):
        with open(os.path.join(cfg["dir"], "log.txt")) as f:
            tail = f.read().strip().splitlines()[-1:] or [""]
        why = f"timed out after {timeout} s" if proc.returncode == -9 else f"exit {proc.returncode}: {tail[0][:200]}"
        return {**figures, "error": why}
    with open(cfg["result"]) as f:
        result = json.load(f)
    seconds = result["step_seconds"]
    # the loader worker makes every batch of the run (warm-up and timed: one epoch), so its CPU time per batch,
    # over the mean step time, is the share of a second core it kept busy
    worker_share = (sum(worker_cpu.values()) / (cfg["warmup"] + cfg["steps"])) / statistics.mean(seconds)
    return {**figures, **result, "workers_peak_private_mib": peak_private[0] / 1024,
            "peak_memory_mib": result["peak_rss_mib"] + peak_private[0] / 1024,
            "workers_cpu_s": sum(worker_cpu.values()), "worker_cores": worker_share,
            "images_per_sec": cfg["batch_size"] * len(seconds) / sum(seconds),
            "median_step_images_per_sec": cfg["batch_size"] / statistics.median(seconds)}


def summarise(runs):
    """A configuration's runs at one side -> mean figures (None where every run failed)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return None

    def mean(key):
        return statistics.mean(r[key] for r in good)
    out = {key: mean(key) for key in ("images_per_sec", "peak_rss_mib", "workers_peak_private_mib", "peak_memory_mib",
                                      "worker_cores")}
    out.update(runs_images_per_sec=[r["images_per_sec"] for r in good], precision=good[0]["precision"],
               failed_runs=len(runs) - len(good))
    if "data_wait_fraction" in good[0]:
        out["data_wait_fraction"] = mean("data_wait_fraction")
    return out


def fmt(value, digits=0):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}x" if a and b else "n/a"


def tables(summary, sizes, configs):
    """The Markdown table of every configuration, and that of the ratios."""
    lines = ["| px | configuration | computes in | images/s (runs) | peak RSS (MiB) | + loader workers (MiB) "
             "| loader worker, cores | loader wait |", "|---|---|---|---|---|---|---|---|"]
    for side in sizes:
        for name in configs:
            s = summary[side][name]
            if s is None:
                lines.append(f"| {side} | {CONFIGS[name]} | failed | | | | | |")
                continue
            runs = " / ".join(fmt(v, 1) for v in s["runs_images_per_sec"])
            wait = f"{100 * s['data_wait_fraction']:.0f}%" if "data_wait_fraction" in s else "-"
            workers = (f"{fmt(s['workers_peak_private_mib'])} | {s['worker_cores']:.2f}"
                       if s["workers_peak_private_mib"] else "- | -")
            lines.append(f"| {side} | {CONFIGS[name]} | {s['precision']} | {fmt(s['images_per_sec'], 1)} ({runs}) | "
                         f"{fmt(s['peak_rss_mib'])} | {workers} | {wait} |")
    ratio_lines = []
    if "medssl" in configs:
        ratio_lines = ["| px | MedSSL default / lightly-train at its faster precision: images/s | peak memory | "
                       "MedSSL default / MedSSL fp32: images/s |", "|---|---|---|---|"]
        for side in sizes:
            medssl, fp32 = summary[side].get("medssl"), summary[side].get("medssl-fp32")
            lt = [(summary[side][n], n) for n in LIGHTLY_TRAIN_PRECISION if summary[side].get(n)]
            fast, fast_name = max(lt, key=lambda t: t[0]["images_per_sec"]) if lt else (None, None)
            which = f" (vs {LIGHTLY_TRAIN_PRECISION[fast_name]})" if fast else ""
            ratio_lines.append(f"| {side} | {ratio(medssl, fast, 'images_per_sec')}{which} | "
                               f"{ratio(medssl, fast, 'peak_memory_mib')} | {ratio(medssl, fp32, 'images_per_sec')} |")
    if "medssl-byol" in configs and "lightly-byol" in configs:
        ratio_lines += ["", "| px | MedSSL BYOL / lightly BYOL recipe: images/s | peak memory |", "|---|---|---|"]
        for side in sizes:
            a, b = summary[side].get("medssl-byol"), summary[side].get("lightly-byol")
            ratio_lines.append(f"| {side} | {ratio(a, b, 'images_per_sec')} | {ratio(a, b, 'peak_memory_mib')} |")
    return "\n".join(lines), "\n".join(ratio_lines)


def main():
    args = get_args_parser().parse_args()
    if args.child:
        return child(args.child)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"error: --configs: unknown configuration {bad[0]!r}; use any of {', '.join(CONFIGS)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        sys.exit(f"error: --sizes {args.sizes!r}: give comma-separated sides in px, e.g. 28,64,128")
    steps = steps_per_side(args.steps, sizes)
    if min(sizes) < 16 or min(steps.values()) < 1 or args.warmup < 1 or args.runs < 1 or args.batch_size < 2:
        sys.exit("error: --sizes from 16 px, --steps, --warmup and --runs at least 1, --batch-size at least 2")
    import importlib.util
    needs = {"lightly_train": any(c in LIGHTLY_TRAIN_PRECISION for c in configs),
             "lightly": any("byol" in c for c in configs)}
    missing = [m for m, needed in needs.items() if needed and importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: bench_lightly_train.py needs {missing[0].replace('_', '-')}: "
                 f"pip install -r benchmarks/requirements.txt")
    import numpy as np

    data_path(args.data, args.data_root)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_lightly_train_")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = []
    for side in sizes:
        n_images = (args.warmup + steps[side]) * args.batch_size  # one lightly-train epoch holds every step
        images = source_images(args.data, args.data_root, n_images, side)
        folder = os.path.join(workdir, f"png_{side}")
        write_pngs(folder, images)
        np.save(os.path.join(workdir, f"images_{side}.npy"), images)
        for run in range(args.runs):
            for name in configs:
                print(f"[{side} px, run {run + 1}/{args.runs}] {name}", file=sys.stderr, flush=True)
                run_dir = os.path.join(workdir, f"{side}px_{name}_run{run + 1}")
                cfg = {"name": name, "size": side, "run": run + 1, "batch_size": args.batch_size, "lr": args.lr,
                       "steps": steps[side], "warmup": args.warmup, "threads": args.threads, "folder": folder,
                       "images": os.path.join(workdir, f"images_{side}.npy"), "dir": run_dir,
                       "result": os.path.join(run_dir, "result.json")}
                result = run_one(cfg, args.timeout)
                if "error" in result:
                    print(f"  failed: {result['error']} (log: {run_dir}/log.txt)", file=sys.stderr, flush=True)
                else:
                    print(f"  {result['images_per_sec']:.1f} images/s, peak RSS {result['peak_rss_mib']:.0f} MiB",
                          file=sys.stderr, flush=True)
                results.append({"config": name, "size": side, "run": run + 1, **result})
    load_after = os.getloadavg()[0]
    summary = {side: {name: summarise([r for r in results if r["size"] == side and r["config"] == name])
                      for name in configs} for side in sizes}
    version = next((r["lightly_train"] for r in results if "lightly_train" in r), None)
    threads = sorted({r["threads"] for r in results if "threads" in r})
    timed = ", ".join(f"{steps[side]} at {side} px" for side in sizes)
    head = (f"SimCLR, ResNet-18, batch {args.batch_size}, AdamW lr {args.lr:g}, {args.data} images; CPU, "
            f"{os.cpu_count()} cores, torch threads {', '.join(map(str, threads)) or '-'}; lightly-train {version}; "
            f"{args.warmup} warm-up + {timed} timed steps, {args.runs} runs each, interleaved; 1-min load average "
            f"{load_before:.2f} before, {load_after:.2f} after; {time.perf_counter() - started:.0f} s in all")
    figures, ratios = tables(summary, sizes, configs)
    text = f"{head}\n\n{figures}\n\n{ratios}\n"
    print(f"\n{text}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "bench_lightly_train", "argv": sys.argv[1:], "lightly_train": version,
                       "load_avg_1min_before": load_before, "load_avg_1min_after": load_after, "cpus": os.cpu_count(),
                       "summary": {str(k): v for k, v in summary.items()}, "runs": results}, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
