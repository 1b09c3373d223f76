"""Images/s of one full pretraining step (batch gather + two augmented views + forward/backward +
the method's own updates, BYOL's EMA) against the same step on pre-made views, the model-only ceiling.
BYOL by default; --method takes any pretraining method (common/methods.py).

    python benchmarks/bench_byol_step.py [--arch resnet18 --size 28 --batch-size 256 --steps 5]
    python benchmarks/bench_byol_step.py --method simclr --aug simclr
    python benchmarks/bench_byol_step.py --method simclr --size 64 --batch-size 128 --profile 20

Target on CPU (ResNet-18, 28 px, batch 256): the full step within 5% of the ceiling."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402  (method_step: a method's own step over an image pool)
from common import augment, cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="byol", choices=bench_speed.METHODS,
                        help="pretraining method (default byol)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements, alternating full and ceiling")
    parser.add_argument("--aug", default=None,
                        help="a preset or paper 002 menu string (default: the method's, byol+ for BYOL)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the scripts' --precision (default auto)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile the full step (torch.profiler) and print its N costliest operations")
    opts = parser.parse_args()
    device = cli.pick_device(opts.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (opts.batch_size * opts.steps, 1, opts.size, opts.size), dtype=torch.uint8,
                           device=device)
    step = bench_speed.method_step(opts.method, ["--arch", opts.arch, "--batch-size", opts.batch_size,
                                                 "--precision", opts.precision,
                                                 *(["--aug", opts.aug] if opts.aug else [])], device, images)
    gen = torch.Generator(device).manual_seed(0)
    premade = augment.two_views(images[:opts.batch_size], step.run.views, gen)
    real_two_views = augment.two_views
    count = iter(range(10**9))

    def measure(full):
        """images/s of opts.steps of the method's own step; the ceiling replaces its augmentation."""
        augment.two_views = real_two_views if full else (lambda batch, views, g: premade)
        start = time.perf_counter()
        for _ in range(opts.steps):
            loss = step(next(count))
        loss.item()  # waits for the device
        return opts.steps * opts.batch_size / (time.perf_counter() - start)

    try:
        measure(True), measure(False)  # warm-up
        full, ceiling = [], []
        for _ in range(opts.repeats):
            full.append(measure(True))
            ceiling.append(measure(False))
    finally:
        augment.two_views = real_two_views
    full, ceiling = max(full), max(ceiling)  # best of repeats: least disturbed by other processes
    print(f"device {device}, threads {torch.get_num_threads()}, {opts.method}, {opts.arch}, {opts.size} px, "
          f"batch {opts.batch_size}, aug {step.args.aug}, {step.run.precision.name}, "
          f"{'channels_last' if step.run.precision.channels_last else 'contiguous'}")
    if opts.profile:
        print(profile(step, count, opts.steps, opts.profile, device))
    print(f"full step (augmentation included): {full:8.1f} images/s")
    print(f"pre-made views (model-only ceiling): {ceiling:8.1f} images/s")
    print(f"full / ceiling: {full / ceiling:.3f}  (target >= 0.95)")


def profile(step, count, steps, top, device):
    """The full step's costliest operations over `steps` steps: self time by operation, with the share of
    the profiled time (where a step's time goes: convolutions, their backward, the augmentation, the rest)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            loss = step(next(count))
        loss.item()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=48)


if __name__ == "__main__":
    main()
