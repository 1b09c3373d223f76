"""The DINO and MAE steps of pretrain_dino.py and pretrain_mae.py beside BYOL's, and beside lightly's DINO and
MAE building blocks on the same model: images/s of each at each image side, in one interleaved run.

    python benchmarks/bench_lightly_methods.py                          # CPU, 28 and 64 px, batch 64
    python benchmarks/bench_lightly_methods.py --device cuda --steps 20 --out runs/bench-methods/methods.json

Configurations, each at every --sizes side, on the same random uint8 gray images (3 input channels: gray
repeated):
  - BYOL, ResNet-18: pretrain_byol.build's step with its defaults (bench_speed.method_step), for scale.
  - DINO, ResNet-18 (heads with BatchNorm, --head-bn) and DINO, --vit (--patch-size: the scripts' default for
    the side, 4 px at 28, 8 px at 64): the two global views and --local-crops local views of
    local_side px (96/224 of the side, whole patches for the ViT), a head of --head-hidden, --head-bottleneck
    and --out-dim (configs/cpu_dino.yaml's), AdamW, a teacher EMA.
      medssl: pretrain_dino.build's step, views drawn on the device from the uint8 tensor held there.
      lightly: DINOTransform (the same crop sides, scales and number of views) on PIL images in a DataLoader
      with --workers worker processes, then per view (as lightly's DINO example) the same encoder with
      DINOProjectionHead (the same widths), DINOLoss, cancel_last_layer_gradients, update_momentum on a
      cosine_schedule, AdamW.
  - MAE, --vit: a mask ratio of 0.75 and a decoder of --decoder-depth blocks --decoder-width wide
    (configs/cpu_mae.yaml's), AdamW.
      medssl: pretrain_mae.build's step (one view, --aug base, on the device).
      lightly: MAETransform in the DataLoader, MaskedVisionTransformerTIMM around the encoder that
      models.build_encoder makes, MAEDecoderTIMM (deprecated in lightly 1.6 for
      MaskedVisionTransformerDecoderTIMM; the same blocks), random_token_mask, set_at_index / get_at_index,
      patchify and the mean squared error on the hidden patches' pixels, AdamW.
Both sides compute in the Precision that --precision (the scripts' flag, default auto) resolves to for the
network and side (common/precision.py): lightly's forward runs under the same autocast, its modules in the
same memory layout and, for a ResNet in bf16 on a CPU, with the same tiny convolutions as matrix products,
so that the model's arithmetic is the same on both sides.

Each side runs in blocks of --warmup untimed then --steps timed steps, the sides of one image side taking
turns, --repeats times; each side's best block counts (the least disturbed by other processes). lightly's
DataLoader starts its workers at the start of each of its blocks and stops them at its end: they work in
the block's untimed steps as they do in training, and neither take cores from the other sides' blocks nor
hold batches made during them. images/s counts source images (a DINO step on B images makes 2B global and
B x --local-crops local views). Needs `pip install -r benchmarks/requirements.txt` (lightly)."""
import argparse
import copy
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CONFIGS = ("byol-resnet18", "dino-resnet18", "dino-vit", "mae-vit")


def get_args_parser():
    parser = argparse.ArgumentParser("bench_lightly_methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every step runs (default cpu)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, any of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64], help="image sides in pixels (default 28 64)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per step (default 64, the CPU configs'; Caron et al.: 1024, He et al.: 4096)")
    parser.add_argument("--images", type=int, default=1024, help="uint8 images in the set (default 1024)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed blocks of each side, in turns (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers (default 2)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the scripts' --precision, for both sides (default auto)")
    parser.add_argument("--vit", default="vit_tiny_patch16_224",
                        help="the timm ViT of the ViT rows, at the scripts' default patch size for the side "
                             "(default vit_tiny_patch16_224; Caron et al.: vit_small_patch16_224, He et al.: "
                             "vit_base_patch16_224)")
    parser.add_argument("--local-crops", type=int, default=6,
                        help="DINO's local views per image (default and Caron et al. Table 8: 6)")
    parser.add_argument("--out-dim", type=int, default=1024,
                        help="DINO head's output width (default configs/cpu_dino.yaml's 1024; Caron et al.: 65536)")
    parser.add_argument("--head-hidden", type=int, default=1024,
                        help="DINO head's hidden width (default configs/cpu_dino.yaml's 1024; Caron et al.: 2048)")
    parser.add_argument("--head-bottleneck", type=int, default=256,
                        help="DINO head's bottleneck width (default and Caron et al.: 256)")
    parser.add_argument("--decoder-depth", type=int, default=2,
                        help="MAE decoder's blocks (default configs/cpu_mae.yaml's 2; He et al.: 8)")
    parser.add_argument("--decoder-width", type=int, default=128,
                        help="MAE decoder's width (default configs/cpu_mae.yaml's 128; He et al.: 512)")
    parser.add_argument("--decoder-heads", type=int, default=4,
                        help="MAE decoder's attention heads (default configs/cpu_mae.yaml's 4; He et al.: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file")
    return parser


def parameter_counts(module, prefix):
    """{prefix_params: all parameters, prefix_trainable: those that train}: a DINO head or MAE decoder of each
    side, for the table's like-for-like check."""
    return {f"{prefix}_params": sum(p.numel() for p in module.parameters()),
            f"{prefix}_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


# ================================================================ MedSSL's side: the scripts' own steps
def medssl_side(method, arch, args, size, device, images):
    """The step of pretrain_<method>.build with its defaults and the benchmark's model flags, over `images`
    (uint8 on the device), as a function of nothing, and what the lightly side needs to match it."""
    import bench_speed
    flags = ["--arch", arch, "--size", size, "--batch-size", args.batch_size, "--precision", args.precision]
    if method == "dino":
        flags += ["--local-crops", args.local_crops, "--out-dim", args.out_dim, "--head-hidden", args.head_hidden,
                  "--head-bottleneck", args.head_bottleneck, *(["--head-bn"] if arch == "resnet18" else [])]
    if method == "mae":
        flags += ["--decoder-depth", args.decoder_depth, "--decoder-width", args.decoder_width,
                  "--decoder-heads", args.decoder_heads]
    step = bench_speed.method_step(method, flags, device, images)
    count = iter(range(10**9))
    side = {"step": lambda: step(next(count)), "precision": step.run.precision, "args": step.args,
            "modules": step.method.modules}
    if method == "dino":
        side["counts"] = parameter_counts(step.method.modules["head"], "head")
    if method == "mae":
        side["counts"] = parameter_counts(step.method.modules["decoder"], "decoder")
    return side


# ================================================================ lightly's side: its building blocks
def lightly_side(array, transform, args, device, train_step, counts):
    """A lightly side: step() is train_step(views, i) on the next batch of `transform`ed PIL images of `array`
    from a DataLoader with --workers workers, in the pass over it that `block` opens as side["batches"]."""
    import torch

    from bench_lightly import PILImages
    loader = torch.utils.data.DataLoader(PILImages(array, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers, pin_memory=device.type == "cuda")
    side, count = {"loader": loader, "counts": counts}, iter(range(10**9))
    side["step"] = lambda: train_step(next(side["batches"]), next(count))
    return side


def lightly_dino(medssl, arch, args, size, device, array):
    """lightly's DINO on the encoder models.build_encoder makes for `arch`: DINOTransform in the DataLoader,
    DINOProjectionHead, DINOLoss, update_momentum; every module prepared in the MedSSL side's Precision."""
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    import pretrain_dino
    from common import models
    precision, margs = medssl["precision"], medssl["args"]
    backbone = models.build_encoder(arch, "imagenet", 3, size=size, patch_size=margs.patch_size, pool=margs.pool)
    patch = backbone.patch_embed.patch_size[0] if models.is_vit(backbone) else None
    transform = DINOTransform(global_crop_size=size, global_crop_scale=tuple(margs.crop_scale),
                              local_crop_size=pretrain_dino.local_side(margs, patch),
                              local_crop_scale=tuple(margs.local_crop_scale), n_local_views=args.local_crops)
    with warnings.catch_warnings():  # its head uses torch's older weight_norm, which deepcopy cannot copy
        warnings.simplefilter("ignore", FutureWarning)
        head, teacher_head = (DINOProjectionHead(models.feature_dim(backbone), args.head_hidden, args.head_bottleneck,
                                                 args.out_dim, batch_norm=margs.head_bn,
                                                 freeze_last_layer=margs.freeze_last_layer) for _ in range(2))
    teacher_head.load_state_dict(head.state_dict())
    for m in (backbone, head, teacher_head):
        precision.prepare(m, device, 3, size)
    teacher_backbone = copy.deepcopy(backbone)
    for p in [*teacher_backbone.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    criterion = DINOLoss(output_dim=args.out_dim, warmup_teacher_temp=margs.warmup_teacher_temp,
                         teacher_temp=margs.teacher_temp,
                         warmup_teacher_temp_epochs=margs.warmup_teacher_temp_epochs).to(device)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=margs.lr,
                                  weight_decay=margs.weight_decay)
    total = 10**6

    def step(views, i):
        views = [v.to(device, non_blocking=True).contiguous(memory_format=precision.memory_format) for v in views]
        m = cosine_schedule(i, total, margs.ema, 1.0)
        update_momentum(backbone, teacher_backbone, m)
        update_momentum(head, teacher_head, m)
        with precision.autocast(device.type):
            with torch.no_grad():
                teacher_out = [teacher_head(teacher_backbone(v)).float() for v in views[:2]]
            student_out = [head(backbone(v)).float() for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=0)
        optimizer.step()
        return loss.detach()
    return lightly_side(array, transform, args, device, step, parameter_counts(head, "head"))


def lightly_mae(medssl, arch, args, size, device, array):
    """lightly's MAE around the same timm ViT that models.build_encoder makes: MAETransform in the DataLoader,
    MaskedVisionTransformerTIMM, MAEDecoderTIMM, random_token_mask, patchify, MSE on the hidden patches."""
    import torch
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    from common import models
    precision, margs = medssl["precision"], medssl["args"]
    vit = models.build_encoder(arch, "imagenet", 3, size=size, patch_size=margs.patch_size, pool=margs.pool)
    patch, n_prefix = vit.patch_embed.patch_size[0], vit.num_prefix_tokens
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():  # deprecated in 1.6 for MaskedVisionTransformerDecoderTIMM (the same blocks)
        warnings.simplefilter("ignore")
        decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=patch, in_chans=3,
                                 embed_dim=vit.embed_dim, decoder_embed_dim=args.decoder_width,
                                 decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
                                 num_prefix_tokens=n_prefix)
    for m in (encoder, decoder):
        precision.prepare(m, device, 3, size)
    transform = MAETransform(input_size=size, min_scale=margs.crop_scale[0])
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=margs.lr,
                                  weight_decay=margs.weight_decay, betas=(0.9, 0.95))
    length = encoder.sequence_length

    def step(views, i):
        (x,) = views
        x = x.to(device, non_blocking=True)
        keep, hidden = utils.random_token_mask((len(x), length), mask_ratio=margs.mask_ratio, device=device)
        with precision.autocast(device.type):
            y = decoder.embed(encoder.encode(x, idx_keep=keep))
            tokens = utils.set_at_index(utils.repeat_token(decoder.mask_token, (len(x), length)), keep,
                                        y.type_as(decoder.mask_token))
            pred = decoder.predict(utils.get_at_index(decoder.decode(tokens), hidden))
        target = utils.get_at_index(utils.patchify(x, patch), hidden - n_prefix)  # the patches lack the prefix
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return lightly_side(array, transform, args, device, step, parameter_counts(decoder, "decoder"))


# ================================================================ timing
def block(side, warmup, steps, batch_size, device):
    """images/s of `steps` steps of a side after `warmup` untimed ones; a lightly side draws its batches from
    a fresh pass over its DataLoader (its workers start here and stop at the end)."""
    import torch
    if "loader" in side:
        side["batches"] = iter(side["loader"])  # its workers start
    try:
        for _ in range(warmup):
            side["step"]()
        start = time.perf_counter()
        for _ in range(steps):
            loss = side["step"]()
        float(loss)  # waits for the device
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        side.pop("batches", None)  # its workers stop
    return steps * batch_size / seconds, float(loss)


def machine_load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main():
    args = get_args_parser().parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"error: --configs: unknown configuration {bad[0]!r}; use any of {', '.join(CONFIGS)}")
    if args.images < args.batch_size:
        sys.exit(f"error: --images {args.images} is less than one batch of --batch-size {args.batch_size}; "
                 f"give at least {args.batch_size}")
    try:
        import lightly
    except ImportError:
        sys.exit("bench_lightly_methods.py needs lightly: pip install -r benchmarks/requirements.txt")
    import numpy as np
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = machine_load()

    rows = []
    for size in args.sizes:
        # ---- data: the same random uint8 gray images for both sides (the speed does not depend on content)
        torch.manual_seed(0)
        array = np.random.default_rng(0).integers(0, 256, (args.images, size, size), dtype=np.uint8)
        images = torch.from_numpy(array)[:, None].to(device)

        # ---- the sides: each configuration's MedSSL step, and lightly's where it has the method
        sides = {}
        for config in configs:
            method, arch = config.split("-")
            arch = args.vit if arch == "vit" else arch
            medssl = medssl_side(method, arch, args, size, device, images)
            sides[(method, arch, "medssl")] = medssl
            if method == "dino":
                sides[(method, arch, "lightly")] = lightly_dino(medssl, arch, args, size, device, array)
            if method == "mae":
                sides[(method, arch, "lightly")] = lightly_mae(medssl, arch, args, size, device, array)

        # ---- the blocks, in turns
        best, loss = dict.fromkeys(sides, 0.0), {}
        for _ in range(args.repeats):
            for key, side in sides.items():
                rate, loss[key] = block(side, args.warmup, args.steps, args.batch_size, device)
                best[key] = max(best[key], rate)
        for (method, arch, who), rate in best.items():
            medssl = sides[(method, arch, "medssl")]
            row = {"method": method, "arch": arch, "side": who, "size": size, "batch": args.batch_size,
                   "images_per_sec": rate, "precision": medssl["precision"].describe(),
                   "last_loss": loss[(method, arch, who)], **sides[(method, arch, who)].get("counts", {})}
            if who == "medssl" and (method, arch, "lightly") in best:
                row["ratio_medssl_lightly"] = rate / best[(method, arch, "lightly")]
            rows.append(row)
        del sides

    # ---- the table
    load_after = machine_load()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, lightly {lightly.__version__}, batch {args.batch_size}, "
          f"{args.workers} DataLoader workers for lightly; best of {args.repeats} blocks of {args.warmup} + "
          f"{args.steps} steps; 1-min load {load_before} before, {load_after} after")
    print("both sides of a row compute in the Precision of --precision "
          f"{args.precision} (lightly's forward under the same autocast, its modules in the same layout)\n")
    print("| method | arch | side | px | computes in | images/s | medssl / lightly |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio_medssl_lightly']:.2f}x" if "ratio_medssl_lightly" in r else "-"
        print(f"| {r['method']} | {r['arch']} | {r['side']} | {r['size']} | {r['precision']} | "
              f"{r['images_per_sec']:.1f} | {ratio} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "bench_lightly_methods", "argv": sys.argv[1:], "device": where,
                       "torch": torch.__version__, "lightly": lightly.__version__, "load_before": load_before,
                       "load_after": load_after, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
