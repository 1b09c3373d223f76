"""Augmentation throughput: images/s of augment.two_views for every --aug preset (and the whole
paper 002 menu) at 28 and 224 px (a preset's blur is off at 28 px: augment.blur_is_off), of the
random resized crop and the colour jitter alone (BYOL's, p=1), and of the hue shift alone:
augment's exact HSV shift (as torchvision's adjust_hue) against a cheaper YIQ chroma rotation,
whose error at hue 0.1 is about as large as the shift itself.

    python benchmarks/bench_augment.py                     # CPU, 28 and 224 px
    python benchmarks/bench_augment.py --device cuda --batch-size 256
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import augment  # noqa: E402


def yiq_hue(x, turns):
    """An approximate hue shift, for comparison only: a chroma rotation in YIQ, one 3x3 matrix per
    image (exact for luma, not for hue)."""
    rgb_to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              dtype=torch.float64, device=x.device)
    angle = -2 * math.pi * turns.double()
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(x.shape[0], 3, 3, dtype=torch.float64, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = torch.linalg.inv(rgb_to_yiq) @ rot @ rgb_to_yiq
    return torch.einsum("bij,bjhw->bihw", m.to(x.dtype), x).clamp_(0, 1)


def images_per_s(fn, n_images, device, repeats):
    """Best of `repeats` timed calls after one warm-up call (constants cached, kernels loaded)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="28,224", help="image sides in px, comma-separated (default: 28,224)")
    p.add_argument("--batch-size", type=int, default=256, help="images per call (default: 256, the BYOL batch)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3],
                   help="3 (default: colour jitter and hue do work) or 1 (MedMNIST gray)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure, best taken (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default: 1, as one data-loading core; more threads on a busy "
                        "machine measure the contention, not the code)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    specs = list(augment.NAMES) + ["+".join(augment.MENU)]
    results = {"device": str(device), "batch_size": args.batch_size, "channels": args.channels,
               "threads": torch.get_num_threads(), "two_views": {}, "ops": {}, "hue": {}}
    for side in (int(s) for s in args.sizes.split(",")):
        g = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch_size, args.channels, side, side)
        images = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)
        for spec in specs:
            views = augment.views(spec)
            rate = images_per_s(lambda: augment.two_views(images, views, g), args.batch_size, device, args.repeats)
            results["two_views"][f"{spec}@{side}"] = rate
            print(f"two_views {spec:<58} {side:>4} px  {rate:>10,.0f} images/s (2 views each)")
        x = images.float() / 255
        for name, fn in [("random_resized_crop", lambda: augment.random_resized_crop(x, g)),
                         ("color_jitter", lambda: augment.color_jitter(x, g, p=1.0))]:
            rate = images_per_s(fn, args.batch_size, device, args.repeats)
            results["ops"][f"{name}@{side}"] = rate
            print(f"op alone  {name:<58} {side:>4} px  {rate:>10,.0f} images/s")
        if args.channels == 3:
            turns = torch.rand(args.batch_size, generator=g, device=device) * 0.2 - 0.1
            for name, fn in [("yiq (approximate)", yiq_hue), ("hsv (exact)", augment._shift_hue)]:
                rate = images_per_s(lambda: fn(x, turns), args.batch_size, device, args.repeats)
                results["hue"][f"{name}@{side}"] = rate
                print(f"hue alone {name:<58} {side:>4} px  {rate:>10,.0f} images/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
