"""Speed of own images: conversion images/s from PNG class folders into the npz cache (at 28 px and
224 px, from 28 px and 256 px PNGs), the time to load a cached 224 px split, and batch gathering in
device mode against host-memory mode (pinned host memory + non-blocking copy, on a GPU).

    python benchmarks/bench_data.py                     # 4,000 images each, about a minute on 2 cores
    python benchmarks/bench_data.py --n 20000 --processes 8 --out results/data_speed.json

The PNGs are BreastMNIST's images ($MEDMNIST_ROOT) repeated to --n, upscaled (bicubic) for the 256 px
source; without the files, random images of the same sizes. Conversion uses every CPU core (or
--processes) as the scripts do; each figure is one timed run after the PNGs are on disk (the
page cache is warm, as on the second epoch of a user's folder)."""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import convert, data  # noqa: E402


def source_images(n, side):
    path = os.path.join(os.environ.get("MEDMNIST_ROOT", ""), "breastmnist.npz")
    if os.path.isfile(path):
        with np.load(path) as npz:
            images, labels = npz["train_images"], npz["train_labels"][:, 0]
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (546, 28, 28), dtype=np.uint8), np.arange(546) % 2
    reps = np.arange(n) % len(images)
    base = images[reps]
    if side != base.shape[1]:
        base = np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.Resampling.BICUBIC)) for x in base])
    return base, labels[reps]


def write_folder(root, images, labels):
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = os.path.join(root, f"class{y}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(x).save(os.path.join(folder, f"{i:06d}.png"))


def timed_conversion(folder, size, cache):
    data._resolve.cache_clear()
    start = time.perf_counter()
    info = data.describe(folder, size, options=data.DataOptions(cache_dir=cache))
    return time.perf_counter() - start, info


def gather_rate(images, device, host, batch=256, steps=20):
    """Images/s of data.batch with random indices, in device or host-memory mode."""
    held = data.place(images, device, host_memory=host, what="bench")
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(len(images), (batch,), generator=gen).to(device) for _ in range(steps + 2)]
    for i in idx[:2]:
        data.batch(held, i, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in idx[2:]:
        out = data.batch(held, i, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert out.device.type == device.type
    return batch * steps / (time.perf_counter() - start)


def training_rate(images, device, steps, batch=64):
    """images/s of pretrain_byol.build's step (bench_speed.method_step, --aug byol) on a uint8 corpus,
    best of two timed runs of `steps` steps after one warm-up step."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_speed
    batch = min(batch, len(images))
    step = bench_speed.method_step("byol", ["--aug", "byol", "--batch-size", batch, "--arch", "resnet18", "--stem",
                                            "imagenet", "--in-chans", images.shape[1]], device, images.to(device))
    step(0).item()
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for i in range(steps):
            loss = step(i + 1)
        loss.item()
        best = max(best, steps * batch / (time.perf_counter() - start))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="images per source folder (default 4000)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the large PNGs (default 256)")
    parser.add_argument("--processes", type=int, default=None, help="conversion processes (default: every core)")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="BYOL steps timed on the own-data split and on the MedMNIST flag (default 3; 0 = skip)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    every_core = convert.workers
    if args.processes:
        convert.workers = lambda: args.processes
    try:
        return run(args)
    finally:
        convert.workers = every_core


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = {"cores": convert.workers(), "n": args.n, "device": device.type}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for side in (28, args.source_size):
            folder = os.path.join(tmp, f"png{side}")
            write_folder(folder, *source_images(args.n, side))
            for size in ((28,) if side == 28 else (28, 224)):
                took, info = timed_conversion(folder, size, cache)
                figures[f"convert_{side}px_png_to_{size}px_images_per_s"] = args.n / took
            if side == 28 and args.train_steps:  # training from an own-data split vs a MedMNIST flag, same shape
                options = data.DataOptions(cache_dir=cache)
                own = data.load_pretrain_images(folder, 28, device="cpu", in_chans=1, options=options)
                figures["byol_train_own_folder_28px_images_per_s"] = training_rate(own, device, args.train_steps)
                try:
                    flag = data.load_pretrain_images("breastmnist", 28, device="cpu", in_chans=1)
                    figures["byol_train_breastmnist_flag_28px_images_per_s"] = training_rate(
                        flag, device, args.train_steps)
                except Exception as e:  # no MedMNIST file here: the own-data figure stands alone
                    print(f"note: no breastmnist file for the comparison ({e})")
        start = time.perf_counter()
        data._resolve.cache_clear()
        train = data.load_split(folder, "train", 224, options=data.DataOptions(cache_dir=cache), device="cpu")
        figures["load_cached_224px_train_split_s"] = time.perf_counter() - start
        figures["cached_224px_train_split_images"] = len(train.images)
        figures["cached_224px_npz_mb"] = os.path.getsize(info.path) / 1e6
    images = train.images
    figures["gather_224px_device_mode_images_per_s"] = gather_rate(images, device, host=False)
    if device.type == "cuda":
        figures["gather_224px_host_mode_images_per_s"] = gather_rate(images, device, host=True)
    for k, v in figures.items():
        print(f"{k:48s} {v:,.2f}" if isinstance(v, float) else f"{k:48s} {v}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
