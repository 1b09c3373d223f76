"""BYOL and BYOL+ pretraining of a ResNet encoder on MedMNIST train images (labels unused).

Paper 001 (Murphy, "Leveraging BYOL for Image Classification in Limited-Labeled Medical Domains"):
ResNet-18, Adam 1e-4, EMA 0.99, batch 256, 1000 epochs on ChestMNIST; BYOL+ adds cutout, contrast
and brightness. BYOL itself: Grill et al. 2020.

    python pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+
    torchrun --nproc_per_node=4 pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+ --sync-bn
"""
import argparse
import copy
import functools
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import augment, cli, data, dist, models, optim, pretrain, rundir


def get_args_parser():
    parser = argparse.ArgumentParser("BYOL pretraining", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, data_help="dataset flag(s) whose train images are the unlabeled "
                           "corpus; several joined by commas (paper 001: chestmnist)")
    parser.set_defaults(data="chestmnist", arch="resnet18", stem="imagenet", in_chans=3)

    # * BYOL
    g = parser.add_argument_group("BYOL")
    g.add_argument("--aug", default="byol+", choices=sorted(augment.PRESETS),
                   help="view augmentations: byol = Grill et al.'s asymmetric pair, paper001 = what paper 001 "
                        "used, byol+ = paper001 + cutout, contrast, brightness (paper 001 §4.2)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: the preset's, 0.08 1 as in BYOL; "
                        "small images may want a larger MIN)")
    g.add_argument("--projector-hidden", type=int, default=4096, help="projector hidden width (paper 001: 4096)")
    g.add_argument("--projector-out", type=int, default=256, help="projection size (paper 001: 256)")
    g.add_argument("--predictor-hidden", type=int, default=4096, help="predictor hidden width (Grill et al.: 4096)")
    g.add_argument("--ema", type=float, default=0.99, help="target EMA decay tau (paper 001 §5.1: 0.99)")
    g.add_argument("--ema-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant tau (paper 001) or cosine from tau to 1 over training (Grill et al. §3.2)")

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--init", default="random",
                   help="random | imagenet | <checkpoint or .pth> (paper 001: imagenet)")
    g.add_argument("--epochs", type=int, default=1000, help="epochs (paper 001 §5.1: 1000)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, split evenly over torchrun's processes (paper 001 §5.4: 256)")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper 001 §5.4: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="Adam weight decay (paper 001: 1e-6)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (paper 001) or cosine decay to 0 after --warmup-epochs")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs for --lr-schedule cosine")

    # * Monitoring and speed
    g = parser.add_argument_group("monitoring and speed")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N epochs, log the kNN AUC on the validation split of the first --data flag "
                        "(its train labels are the kNN memory; 0 = never)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    cli.add_resume_and_ddp_flags(parser)
    return parser


def byol_loss(p, z):
    """2 - 2 cos(p, z), the normalised MSE of Grill et al. 2020 Eq. 2, averaged over the batch.
    `z` is the target's projection: no gradient flows into it."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


@torch.no_grad()
def update_target(target, online, tau):
    """target <- tau * target + (1 - tau) * online, once per optimiser step (Grill et al. Eq. 1)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def train_one_epoch(args, nets, optimizer, images, aug_gen, epoch, step, steps_per_epoch, device, resume=None,
                    save=None):
    """One epoch, from its start or from `resume` (a checkpoint's position inside it); `save(**position)`
    checkpoints the run every --save-every steps. Returns the step count and the epoch's figures."""
    encoder, projector, predictor, target_encoder, target_projector, forward_encoder = nets
    online = dist.distributed(torch.nn.Sequential(forward_encoder, projector, predictor), device)
    total_steps = args.epochs * steps_per_epoch
    perm, epoch_start, first, losses = pretrain.start_epoch(len(images), aug_gen, resume)
    views = augment.preset(args.aug, args.crop_scale)
    start = time.time()
    bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not dist.is_main())
    for i in bar:
        lr = learning_rate(args, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tau = args.ema if args.ema_schedule == "constant" else optim.cosine(step, total_steps, args.ema, 1.0)

        batch = images[perm[i * args.batch_size:(i + 1) * args.batch_size]]
        # every rank augments the whole global batch and keeps its own rows: an image's views do not
        # depend on the number of processes, and aug_gen stays in step on every rank
        x1, x2 = (data.to_input(dist.my_rows(v), args.in_chans).contiguous(memory_format=torch.channels_last)
                  for v in augment.two_views(batch, views, aug_gen))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p1, p2 = online(x1), online(x2)
            with torch.no_grad():
                z1 = target_projector(target_encoder(x1))
                z2 = target_projector(target_encoder(x2))
            # symmetric: each view's prediction regresses the other view's target (Grill et al. Eq. 2)
            loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the same on every rank: an EMA of the online weights, which DDP keeps the same
        update_target(target_encoder, encoder, tau)
        update_target(target_projector, projector, tau)

        losses.append(dist.mean_over_ranks(loss.detach()))  # the global batch's loss
        step += 1
        if i % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{lr:.2e}")
        if save and args.save_every and step % args.save_every == 0 and i + 1 < steps_per_epoch:
            save(epoch=epoch, step=step, step_in_epoch=i + 1, epoch_start=epoch_start, losses=losses)
    loss = pretrain.mean_finite_loss(losses, step, epoch, args.out)
    seconds = time.time() - start
    return step, {"loss": loss, "lr": lr, "ema": tau,
                  "images_per_sec": round((steps_per_epoch - first) * args.batch_size / seconds, 1)}


def learning_rate(args, step, steps_per_epoch):
    return optim.learning_rate(args.lr_schedule, step, args.epochs * steps_per_epoch, args.lr,
                               args.warmup_epochs * steps_per_epoch)


def knn_monitor(args, encoder, device, splits):
    """kNN AUC of the current encoder on the validation split: is the representation improving?"""
    return models.knn_val_auc(encoder, *splits, args.in_chans, k=20)


def main():
    args = cli.parse_args(get_args_parser())
    device = dist.init_distributed(cli.pick_device(args.device))  # under torchrun: join its processes
    args.out = args.out or dist.on_main(cli.default_out, "pretrain_byol", args.data)

    # ---- data: the train split(s), whole, as uint8 on the device
    images = data.load_pretrain_images(args.data, args.size, args.data_root, device, args.in_chans)
    steps_per_epoch = pretrain.steps_per_epoch(len(images), args.batch_size, args.max_steps)
    monitor_splits = data.monitor_splits(args.data, args.size, args.data_root, device, args.in_chans) \
        if dist.is_main() and args.eval_every else None
    state = rundir.open_run(args)  # the checkpoint of an unfinished run in --out, or None

    # ---- model: online encoder + projector + predictor; target = EMA copy of encoder + projector
    cli.seed_everything(args.seed)
    aug_gen = torch.Generator(device).manual_seed(args.seed)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans)
    projector = models.mlp(models.FEATURE_DIM[args.arch], args.projector_hidden, args.projector_out)
    predictor = models.mlp(args.projector_out, args.predictor_hidden, args.projector_out)
    target_encoder, target_projector = copy.deepcopy(encoder), copy.deepcopy(projector)
    modules = {"encoder": encoder, "projector": projector, "predictor": predictor,
               "target_encoder": target_encoder, "target_projector": target_projector}
    for m in modules.values():
        m.to(device, memory_format=torch.channels_last)
    for p in [*target_encoder.parameters(), *target_projector.parameters()]:
        p.requires_grad_(False)
    if args.sync_bn:  # the target too: its BatchNorm layers also normalise with batch statistics
        for m in modules.values():
            dist.sync_batchnorm(m)
    forward_encoder = torch.compile(encoder) if args.compile else encoder

    # ---- optimiser
    params = [*encoder.parameters(), *projector.parameters(), *predictor.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)

    # ---- resume: weights, optimiser, RNG states and the position, mid-epoch included
    objects = {**modules, "optimizer": optimizer}
    position = rundir.restore_run(state, objects, aug_gen)
    if state:
        print(f"resuming {args.out} at epoch {position['epoch']}, step {position['step_in_epoch']} of it")
    n_trainable = sum(p.numel() for p in params)
    print(f"{len(images)} images, {steps_per_epoch} steps/epoch, {n_trainable / 1e6:.1f}M trainable parameters"
          + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))

    # ---- loop: one JSON line per epoch; the checkpoint is overwritten (atomically) at every epoch's
    # end and every --save-every steps
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    save = functools.partial(pretrain.save_run, checkpoint_path, objects, aug_gen,
                             meta={"format": "medssl", "method": "byol", "arch": args.arch, "stem": args.stem,
                                   "in_chans": args.in_chans, "args": vars(args)})
    nets = (encoder, projector, predictor, target_encoder, target_projector, forward_encoder)
    step = position["step"]
    for epoch in range(position["epoch"], args.epochs):
        step, stats = train_one_epoch(args, nets, optimizer, images, aug_gen, epoch, step, steps_per_epoch, device,
                                      resume=position if epoch == position["epoch"] else None, save=save)
        stats = {"epoch": epoch, **stats}
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and dist.is_main():
            stats["knn_val_auc"] = round(knn_monitor(args, encoder, device, monitor_splits), 4)
        if dist.is_main():
            rundir.append_jsonl(os.path.join(args.out, "log.jsonl"), stats)
        save(epoch=epoch + 1, step=step)
        print(stats)
    print(f"done: {checkpoint_path}")


if __name__ == "__main__":
    cli.run_main(main)
