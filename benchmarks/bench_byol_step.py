"""Images/s of one full BYOL training step (batch gather + two augmented views + forward/backward +
EMA update) against the same step on pre-made views, the model-only ceiling.

    python benchmarks/bench_byol_step.py [--arch resnet18 --size 28 --batch-size 256 --steps 5]

Target on CPU (ResNet-18, 28 px, batch 256): the full step within 5% of the ceiling."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain_byol  # noqa: E402
from common import augment, cli, models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements, alternating full and ceiling")
    parser.add_argument("--aug", default="byol+", help="a preset or paper 002 menu string (default byol+)")
    parser.add_argument("--device", default="auto")
    opts = parser.parse_args()
    device = cli.pick_device(opts.device)
    args = pretrain_byol.get_args_parser().parse_args(
        ["--arch", opts.arch, "--batch-size", str(opts.batch_size), "--aug", opts.aug, "--epochs", "1", "--out", "-"])
    torch.manual_seed(0)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (opts.batch_size * opts.steps, 1, opts.size, opts.size), dtype=torch.uint8,
                           device=device)
    encoder = models.build_encoder(opts.arch)
    projector = models.mlp(models.FEATURE_DIM[opts.arch], 4096, 256)
    predictor = models.mlp(256, 4096, 256)
    target_encoder, target_projector = models.build_encoder(opts.arch), models.mlp(models.FEATURE_DIM[opts.arch], 4096, 256)
    for m in (encoder, projector, predictor, target_encoder, target_projector):
        m.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([*encoder.parameters(), *projector.parameters(), *predictor.parameters()], 1e-4)
    online = torch.nn.Sequential(encoder, projector, predictor)
    nets = pretrain_byol.Networks(online, encoder, projector, target_encoder, target_projector)
    views = augment.views(opts.aug)
    premade = augment.two_views(images[:opts.batch_size], views, gen)
    real_two_views = augment.two_views

    def measure(full):
        """images/s of opts.steps of the script's own train_step; the ceiling replaces its augmentation."""
        augment.two_views = real_two_views if full else (lambda batch, views, g: premade)
        start = time.perf_counter()
        for i in range(opts.steps):
            loss, _ = pretrain_byol.train_step(args, nets, optimizer, views, gen, opts.steps,
                                               images[i * opts.batch_size:(i + 1) * opts.batch_size], i)
        loss.item()  # waits for the device
        return opts.steps * opts.batch_size / (time.perf_counter() - start)

    measure(True), measure(False)  # warm-up
    full, ceiling = [], []
    for _ in range(opts.repeats):
        full.append(measure(True))
        ceiling.append(measure(False))
    augment.two_views = real_two_views
    full, ceiling = max(full), max(ceiling)  # best of repeats: least disturbed by other processes
    print(f"device {device}, threads {torch.get_num_threads()}, {opts.arch}, {opts.size} px, batch {opts.batch_size}, "
          f"aug {opts.aug}")
    print(f"full step (augmentation included): {full:8.1f} images/s")
    print(f"pre-made views (model-only ceiling): {ceiling:8.1f} images/s")
    print(f"full / ceiling: {full / ceiling:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
