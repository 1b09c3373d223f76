"""The BYOL step of pretrain_byol.py against lightly's recipe for the same model, in one run: images/s of
each and their ratio.

    python benchmarks/bench_lightly.py                                 # CPU, batch 256, 28 px
    python benchmarks/bench_lightly.py --device cuda --steps 30        # the same on a GPU

Both train the same ResNet-18 (imagenet stem, 3 input channels: gray images repeated) with 512-4096-256
BYOL heads, Adam 1e-4 and an EMA target of tau 0.99, on the same uint8 gray images of --size px:
  - medssl: the step of pretrain_byol.build(args, run) (bench_speed.method_step: the script's defaults) with
    --aug byol, Grill et al.'s view pair, drawn on the device from the uint8 tensor held there;
    in the script's --precision auto (common/precision.py: bf16 on CUDA, and on a CPU with native bf16
    from 48 px up, with its tiny convolutions as matrix products; float32 elsewhere).
  - lightly: lightly's BYOLTransform (both views at --size px, otherwise its defaults: Grill et al.'s
    pair) applied to PIL images by a torch DataLoader with --workers worker processes (default 2), then
    lightly's BYOL heads, NegativeCosineSimilarity loss and update_momentum on the same encoder, Adam; on
    CUDA the same bf16 autocast and channels_last, so that the model's arithmetic is the same on both sides;
    on the CPU float32, as lightly's recipe runs.
The steps alternate in blocks of --steps, --repeats times; each side's best block counts (the least
disturbed by other processes). Needs `pip install -r benchmarks/requirements.txt` (lightly)."""
import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def get_args_parser():
    parser = argparse.ArgumentParser("bench_lightly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both steps run (default cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default and paper 001: 256)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--images", type=int, default=4096, help="uint8 images in the set (default 4096)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed blocks of each side, alternating (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    return parser


class PILImages:
    """A Dataset of PIL RGB images from a uint8 (N, H, W) array, each through `transform`, as lightly's
    examples feed torchvision datasets."""
    def __init__(self, array, transform):
        self.array, self.transform = array, transform

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.array[i]).convert("RGB"))


def lightly_step_fn(args, device, array):
    """lightly's recipe: BYOLTransform in DataLoader workers, its heads, loss and momentum update."""
    import torch
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    from common import models
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=args.size),
                              view_2_transform=BYOLView2Transform(input_size=args.size))
    loader = torch.utils.data.DataLoader(PILImages(array, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers, persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    backbone = models.build_encoder("resnet18", "imagenet", 3)
    projection, prediction = BYOLProjectionHead(512, 4096, 256), BYOLPredictionHead(256, 4096, 256)
    target_backbone, target_projection = copy.deepcopy(backbone), copy.deepcopy(projection)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for m in (backbone, projection, prediction, target_backbone, target_projection):
        m.to(device, memory_format=memory_format)
    for p in [*target_backbone.parameters(), *target_projection.parameters()]:
        p.requires_grad_(False)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.Adam([*backbone.parameters(), *projection.parameters(), *prediction.parameters()],
                                 lr=1e-4, weight_decay=1e-6)
    batches = iter(())

    def step():
        nonlocal batches
        try:
            x1, x2 = next(batches)
        except StopIteration:
            batches = iter(loader)
            x1, x2 = next(batches)
        x1, x2 = (x.to(device, non_blocking=True).contiguous(memory_format=memory_format) for x in (x1, x2))
        update_momentum(backbone, target_backbone, m=0.99)
        update_momentum(projection, target_projection, m=0.99)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p1, p2 = prediction(projection(backbone(x1))), prediction(projection(backbone(x2)))
            with torch.no_grad():
                z1, z2 = target_projection(target_backbone(x1)), target_projection(target_backbone(x2))
            loss = 0.5 * (criterion(p1.float(), z2.float()) + criterion(p2.float(), z1.float()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def medssl_step_fn(args, device, array):
    """pretrain_byol.build's step on the uint8 images held on the device."""
    import torch

    import bench_speed
    images = torch.from_numpy(array)[:, None].to(device)
    step = bench_speed.method_step("byol", ["--aug", "byol", "--batch-size", args.batch_size, "--arch", "resnet18",
                                            "--stem", "imagenet", "--in-chans", 3], device, images)
    count = iter(range(10**9))
    return lambda: step(next(count))


def images_per_sec(step, steps, batch_size, device):
    import torch
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # waits for the device
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    args = get_args_parser().parse_args()
    try:
        import lightly
    except ImportError:
        sys.exit("bench_lightly.py needs lightly: pip install -r benchmarks/requirements.txt")
    import numpy as np
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    array = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8)
    sides = {"medssl": medssl_step_fn(args, device, array), "lightly": lightly_step_fn(args, device, array)}
    for step in sides.values():
        for _ in range(args.warmup):
            step()
    best = {name: 0.0 for name in sides}
    for _ in range(args.repeats):
        for name, step in sides.items():
            best[name] = max(best[name], images_per_sec(step, args.steps, args.batch_size, device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"BYOL step, ResNet-18, {args.size} px, batch {args.batch_size}, {where}, torch {torch.__version__}, "
          f"lightly {lightly.__version__}, {args.workers} DataLoader workers; best of {args.repeats} x "
          f"{args.steps} steps")
    print(f"medssl (pretrain_byol.build's step, views on the device): {best['medssl']:8.1f} images/s")
    print(f"lightly (BYOLTransform + DataLoader):                      {best['lightly']:8.1f} images/s")
    print(f"ratio medssl / lightly: {best['medssl'] / best['lightly']:.2f}x")


if __name__ == "__main__":
    main()
