"""The measurements behind --precision auto on this machine: images/s of an encoder's forward + backward +
SGD step in each arithmetic and layout the CPU can take, interleaved, at each image side.

    python benchmarks/bench_precision.py                          # ResNet-18, imagenet stem, 28 64 128 224 px
    python benchmarks/bench_precision.py --arch resnet50 --sizes 28 64 --threads 2
    python benchmarks/bench_precision.py --arch vit_tiny_patch16_224 --sizes 28 64   # patch 4 at 28, 8 at 64

Columns: float32 contiguous and channels_last; bf16 autocast channels_last, without and with the tiny
convolutions as matrix products (common/small_convs.py); and what `auto` picks here. Each column's best of
--repeats blocks of --steps steps counts (the least disturbed by other processes)."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import models, precision, small_convs  # noqa: E402

VARIANTS = {"fp32 contiguous": (False, False, False), "fp32 channels_last": (False, True, False),
            "bf16 channels_last": (True, True, False), "bf16 channels_last, matmul small convs": (True, True, True)}
BATCH = {28: 256, 64: 128, 128: 64, 224: 32}


def step_fn(arch, stem, side, batch_size, bf16, channels_last, matmul):
    torch.manual_seed(0)
    encoder = models.build_encoder(arch, stem, 3, size=side)
    if matmul:
        small_convs.as_matmul(encoder, 3, side)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    encoder = encoder.to(memory_format=layout)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, side, side).contiguous(memory_format=layout)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = encoder(x)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="encoder: resnet18/50 or a timm name (default resnet18)")
    parser.add_argument("--stem", default="imagenet", choices=models.STEMS, help="ResNet stem (default imagenet)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128, 224], help="image sides")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed blocks per column, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    native = precision.native_bf16("cpu")
    print(f"{opts.arch}, {opts.stem} stem, CPU, {torch.get_num_threads()} threads, native bf16: {native}, "
          f"torch {torch.__version__}; images/s, best of {opts.repeats} blocks of {opts.steps} steps\n")
    print("| side | batch | " + " | ".join(VARIANTS) + " | auto picks |")
    print("|---" * (len(VARIANTS) + 3) + "|")
    for side in opts.sizes:
        batch_size = BATCH.get(side, 32)
        steps = {name: step_fn(opts.arch, opts.stem, side, batch_size, *v) for name, v in VARIANTS.items()}
        best = dict.fromkeys(steps, 0.0)
        for name, step in steps.items():
            step(), step()  # warm-up: oneDNN picks its kernels on the first calls
        for _ in range(opts.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(opts.steps):
                    step()
                best[name] = max(best[name], opts.steps * batch_size / (time.perf_counter() - start))
        chosen = precision.resolve("auto", "cpu", side,
                                   convolutional=not models.is_vit(models.build_encoder(opts.arch, opts.stem, 3, size=side)))
        print(f"| {side} | {batch_size} | " + " | ".join(f"{best[n]:.0f}" for n in VARIANTS) +
              f" | {chosen.describe()} |", flush=True)


if __name__ == "__main__":
    main()
