"""Paper 002's resources study: time per epoch and peak memory of Barlow Twins pretraining over a
grid of image resolution x batch size, drawn as two colour maps.

Paper 002 (Barlow Twins on chest X-rays, "Self Supervised - Resources study") trained a ResNet-18
with 1 input channel and a 512-unit projector for one epoch on the COVID-19 Radiography dataset
(21,165 images) on an RTX 2070 Super, and chose 224 px and batch 128 from "Img. Resolution vs.
Batch Size colormaps" (the figures did not survive in our copy of the paper, so the paper-scale
grid below is ours, around its choice).

    python benchmarks/bench_resources.py                      # CPU-scale grid, a few minutes on 2 cores
    python benchmarks/bench_resources.py --paper-scale        # 28-256 px x batch 16-256, meant for a GPU
    python benchmarks/bench_resources.py --method byol --dataset chestmnist --out runs/resources-byol

Every cell runs a pretraining method's step as bench_speed.py does (its script's own build(args, run):
its loss, model and views, at its default flags) in a fresh process for a few steps. Time per epoch is
EXTRAPOLATED: measured seconds per step x (dataset images // batch size) steps, as the scripts drop the
last partial batch; it leaves out per-epoch costs (checkpoint, kNN monitor). Peak memory: CUDA
max_memory_allocated, or on the CPU the peak RSS growth over the steps (see bench_speed.py). Writes
resources.json, epoch_time.png and peak_memory.png to --out.
"""
import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402  (the sibling benchmark: its worker measures each cell)
from common import methods  # noqa: E402

# Images per epoch of a named corpus; MedMNIST flags are looked up in medmnist.INFO (train split).
DATASETS = {"covid-19-radiography": (21_165, "COVID-19 Radiography, paper 002's resources study")}
CPU_GRID = {"resolutions": "28,64,128", "batch_sizes": "16,32,64", "steps": 2, "warmup": 1}
PAPER_GRID = {"resolutions": "28,64,128,224,256", "batch_sizes": "16,32,64,128,256", "steps": 10, "warmup": 3}


def get_args_parser():
    parser = argparse.ArgumentParser("bench_resources", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="barlow", choices=bench_speed.METHODS,
                        help="pretraining method whose step is measured (paper 002: barlow)")
    parser.add_argument("--resolutions", default=None,
                        help=f"comma-separated image sides in px (default {CPU_GRID['resolutions']}; "
                             f"--paper-scale {PAPER_GRID['resolutions']})")
    parser.add_argument("--batch-sizes", default=None,
                        help=f"comma-separated batch sizes (default {CPU_GRID['batch_sizes']}; "
                             f"--paper-scale {PAPER_GRID['batch_sizes']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per cell (default {CPU_GRID['steps']}; --paper-scale {PAPER_GRID['steps']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default {CPU_GRID['warmup']}; --paper-scale {PAPER_GRID['warmup']})")
    parser.add_argument("--paper-scale", action="store_true",
                        help="the larger grid above (GPU; cells that do not fit are marked OOM)")
    parser.add_argument("--dataset", default="covid-19-radiography",
                        help="corpus whose epoch is extrapolated: covid-19-radiography (21,165 images, paper 002), "
                             "a MedMNIST 2D flag (its train split, e.g. chestmnist = 78,468), or a number of images")
    parser.add_argument("--variant", default="auto",
                        help="bench_speed.py variant, e.g. cpu+cl or cuda+bf16+cl+compile (default auto: what the "
                             "scripts run, cuda+bf16+cl on a GPU, else cpu+cl)")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="backbone (paper 002: resnet18)")
    parser.add_argument("--in-chans", type=int, default=1, choices=[1, 3], help="input channels (paper 002: 1)")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"], help="encoder stem")
    parser.add_argument("--projector", default=None,
                        help="Barlow Twins projector (default: pretrain_barlow.py's, 512 = paper 002's best)")
    parser.add_argument("--method-flags", default="", metavar="FLAGS",
                        help="more flags of the method's script on top of its defaults, e.g. '--aug byol'")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once; keep 1 for figures (more only for smoke tests)")
    parser.add_argument("--out", default="runs/bench-resources",
                        help="folder for resources.json, epoch_time.png, peak_memory.png")
    return parser


def dataset_size(name):
    """(images per epoch, description) of --dataset."""
    if str(name).isdigit():
        return int(name), f"{int(name):,} images"
    if name in DATASETS:
        return DATASETS[name]
    from medmnist import INFO  # imported here: slow, and only needed for MedMNIST names
    if name not in INFO:
        sys.exit(f"error: --dataset {name!r} is not covid-19-radiography, a MedMNIST flag, nor a number")
    return INFO[name]["n_samples"]["train"], f"{name} train split"


def duration(seconds):
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def heatmap(grid, resolutions, batch_sizes, path, title, colorbar_label, cell_text, note, log=False):
    """One colour map: rows = resolutions, columns = batch sizes, the figure written in each cell;
    missing cells (OOM, failed) grey with their reason."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    values = np.array([[grid[(r, b)].get("value", np.nan) for b in batch_sizes] for r in resolutions], dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if hi <= lo:  # one cell, or all equal: widen so that the norm is defined
        lo, hi = lo * 0.9, hi * 1.1 + 1e-9
    norm = LogNorm(lo, hi) if log and lo > 0 else Normalize(lo, hi)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    fig, ax = plt.subplots(figsize=(1.4 * len(batch_sizes) + 3.5, 0.9 * len(resolutions) + 2.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin="lower", aspect="auto")
    for i, r in enumerate(resolutions):
        for j, b in enumerate(batch_sizes):
            cell = grid[(r, b)]
            if np.isfinite(values[i, j]):
                dark = norm(values[i, j]) < 0.55  # viridis is dark at the low end: white text there
                ax.text(j, i, cell_text(values[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
            else:
                ax.text(j, i, cell.get("missing", "n/a"), ha="center", va="center", fontsize=9, color="black")
    ax.set_xticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
    ax.set_yticks(range(len(resolutions)), [str(r) for r in resolutions])
    ax.set_xlabel("batch size")
    ax.set_ylabel("image resolution (px)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.text(0.01, 0.01, note, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_grid(grid, resolutions, batch_sizes, cell):
    lines = ["| px \\ batch | " + " | ".join(map(str, batch_sizes)) + " |", "|---" * (len(batch_sizes) + 1) + "|"]
    for r in resolutions:
        lines.append(f"| {r} | " + " | ".join(cell(grid[(r, b)]) for b in batch_sizes) + " |")
    return "\n".join(lines)


def main():
    args = get_args_parser().parse_args()
    scale = PAPER_GRID if args.paper_scale else CPU_GRID
    resolutions = [int(v) for v in (args.resolutions or scale["resolutions"]).split(",")]
    batch_sizes = [int(v) for v in (args.batch_sizes or scale["batch_sizes"]).split(",")]
    steps = args.steps or scale["steps"]
    warmup = scale["warmup"] if args.warmup is None else args.warmup
    n_images, described = dataset_size(args.dataset)
    variant = args.variant
    if variant == "auto":
        variant = "cuda+bf16+cl" if bench_speed.cuda_available() else "cpu+cl"
    try:
        parsed = bench_speed.parse_variant(variant)
    except ValueError as e:
        sys.exit(f"error: --variant: {e}")
    if parsed["device"] == "cuda" and not bench_speed.cuda_available():
        sys.exit(f"{variant}: not run: no CUDA")
    if parsed["compile"]:
        warmup = max(warmup, 3)

    flags = (["--projector", args.projector] if args.projector else []) + shlex.split(args.method_flags)
    configs = [{"workload": args.method, "size": r, "batch": b, "variant": variant, "steps": steps, "warmup": warmup,
                "arch": args.arch, "stem": args.stem, "in_chans": args.in_chans, "flags": flags,
                "threads": args.threads} for r in resolutions for b in batch_sizes]
    load_before = bench_speed.machine_load()
    results = bench_speed.run_all(configs, args.timeout, args.jobs)
    load_after = bench_speed.machine_load()

    time_grid, memory_grid = {}, {}
    for r in results:
        key = (r["size"], r["batch"])
        missing = "OOM" if r.get("oom") else "failed" if r.get("error") else None
        if missing:
            time_grid[key] = memory_grid[key] = {"missing": missing}
            continue
        r["steps_per_epoch"] = n_images // r["batch"]
        r["epoch_seconds"] = r["steps_per_epoch"] * r["sec_per_step"]
        time_grid[key] = {"value": r["epoch_seconds"], "sec_per_step": r["sec_per_step"]}
        memory_grid[key] = {"value": r["peak_memory_mib"]}
    measure = next((r["memory_measure"] for r in results if r.get("memory_measure")), "n/a")
    device = next((r["device_name"] for r in results if r.get("device_name")), variant)
    what = f"{methods.get(args.method).label}, {args.arch}, {args.in_chans} channel(s), {variant} on {device}"

    os.makedirs(args.out, exist_ok=True)
    time_png, memory_png = os.path.join(args.out, "epoch_time.png"), os.path.join(args.out, "peak_memory.png")
    heatmap(time_grid, resolutions, batch_sizes, time_png,
            f"Time per epoch (extrapolated), {n_images:,} images\n{described}\n{what}",
            "seconds per epoch (log colour scale)", duration,
            f"Extrapolated: measured s/step ({'mean' if parsed['device'] == 'cuda' else 'median'} of {steps} steps "
            f"after {warmup} warm-up) x (images // batch) "
            f"steps; per-epoch extras (checkpoint, monitor) not included.", log=True)
    heatmap(memory_grid, resolutions, batch_sizes, memory_png,
            f"Peak memory of the pretraining step\n{what}", f"MiB ({measure})", lambda v: f"{v:,.0f}",
            "CPU: peak RSS growth during the steps over the RSS before them (fresh process per cell). "
            "CUDA: torch.cuda.max_memory_allocated (weights, optimiser state and data included).")

    print(f"\n{what}; time per epoch extrapolated to {n_images:,} images ({described}): "
          f"s/step x (images // batch); {bench_speed.load_line(load_before, load_after)}\n")
    print(markdown_grid(time_grid, resolutions, batch_sizes,
                        lambda c: c.get("missing") or f"{duration(c['value'])} ({c['sec_per_step']:.2f} s/step)"))
    print(f"\npeak memory, MiB ({measure}):\n")
    print(markdown_grid(memory_grid, resolutions, batch_sizes, lambda c: c.get("missing") or f"{c['value']:,.0f}"))
    with open(os.path.join(args.out, "resources.json"), "w") as f:
        json.dump({"benchmark": "bench_resources", "argv": sys.argv[1:], "dataset": args.dataset,
                   "dataset_images": n_images, "variant": variant, "memory_measure": measure,
                   "load_before": load_before, "load_after": load_after,
                   "resolutions": resolutions, "batch_sizes": batch_sizes, "results": results,
                   "figures": {"epoch_time": time_png, "peak_memory": memory_png}}, f, indent=2)
    print(f"\nwrote {args.out}/resources.json, {time_png}, {memory_png}")
    if any(r.get("error") for r in results):
        for r in results:
            if r.get("error"):
                print(f"failed: {r['size']} px batch {r['batch']}: {r['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
