"""BYOL and BYOL+ pretraining of a ResNet encoder on MedMNIST train images (labels unused).

Paper 001 (Murphy, "Leveraging BYOL for Image Classification in Limited-Labeled Medical Domains"):
ResNet-18, Adam 1e-4, EMA 0.99, batch 256, 1000 epochs on ChestMNIST; BYOL+ adds cutout, contrast
and brightness. BYOL itself: Grill et al. 2020.

    python pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+
"""
import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import augment, data, models, utils
from common.utils import UserError


def get_args_parser():
    parser = argparse.ArgumentParser("BYOL pretraining", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_flags(parser, data_help="dataset flag(s) whose train images are the unlabeled "
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
    g.add_argument("--batch-size", type=int, default=256, help="batch size (paper 001 §5.4: 256)")
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


def train_one_epoch(args, nets, optimizer, images, aug_gen, epoch, step, steps_per_epoch, device):
    encoder, projector, predictor, target_encoder, target_projector, forward_encoder = nets
    total_steps = args.epochs * steps_per_epoch
    perm = torch.randperm(len(images), generator=aug_gen, device=images.device)
    views = augment.preset(args.aug, args.crop_scale)
    losses = []
    start = time.time()
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    for i in bar:
        lr = learning_rate(args, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tau = args.ema if args.ema_schedule == "constant" else utils.cosine(step, total_steps, args.ema, 1.0)

        batch = images[perm[i * args.batch_size:(i + 1) * args.batch_size]]
        x1, x2 = (data.to_input(v, args.in_chans).contiguous(memory_format=torch.channels_last)
                  for v in augment.two_views(batch, views, aug_gen))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p1 = predictor(projector(forward_encoder(x1)))
            p2 = predictor(projector(forward_encoder(x2)))
            with torch.no_grad():
                z1 = target_projector(target_encoder(x1))
                z2 = target_projector(target_encoder(x2))
            # symmetric: each view's prediction regresses the other view's target (Grill et al. Eq. 2)
            loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_target(target_encoder, encoder, tau)
        update_target(target_projector, projector, tau)

        losses.append(loss.detach())
        step += 1
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
    loss = utils.mean_finite_loss(losses, step, epoch, args.out)
    seconds = time.time() - start
    return step, {"loss": loss, "lr": lr, "ema": tau,
                  "images_per_sec": round(steps_per_epoch * args.batch_size / seconds, 1)}


def learning_rate(args, step, steps_per_epoch):
    return utils.learning_rate(args.lr_schedule, step, args.epochs * steps_per_epoch, args.lr,
                               args.warmup_epochs * steps_per_epoch)


def knn_monitor(args, encoder, device, splits):
    """kNN AUC of the current encoder on the validation split: is the representation improving?"""
    return models.knn_val_auc(encoder, *splits, args.in_chans, k=20)


def main():
    args = utils.parse_args(get_args_parser())
    args.out = args.out or utils.default_out("pretrain_byol", args.data)
    device = utils.pick_device(args.device)

    # ---- data: the train split(s), whole, as uint8 on the device
    images = data.load_pretrain_images(args.data, args.size, args.data_root, device, args.in_chans)
    steps_per_epoch = utils.steps_per_epoch(len(images), args.batch_size, args.max_steps)
    monitor_splits = data.monitor_splits(args, device)
    resume = utils.prepare_run_dir(args.out, args, done_file=None)

    # ---- model: online encoder + projector + predictor; target = EMA copy of encoder + projector
    utils.seed_everything(args.seed)
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
    forward_encoder = torch.compile(encoder) if args.compile else encoder

    # ---- optimiser
    params = [*encoder.parameters(), *projector.parameters(), *predictor.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)

    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, step = 0, 0
    if resume and os.path.exists(checkpoint_path):
        state = utils.load_checkpoint(checkpoint_path)
        if state["epoch"] >= args.epochs:
            raise UserError(f"{args.out} holds a finished run; choose another --out or pass --overwrite")
        for name, m in modules.items():
            m.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        utils.set_rng_state(state["rng"], aug_gen)
        print(f"resuming {args.out} from epoch {start_epoch}")
    n_trainable = sum(p.numel() for p in params)
    print(f"{len(images)} images, {steps_per_epoch} steps/epoch, {n_trainable / 1e6:.1f}M trainable parameters")

    # ---- loop: one JSON line and one checkpoint (overwritten, atomically) per epoch
    nets = (encoder, projector, predictor, target_encoder, target_projector, forward_encoder)
    for epoch in range(start_epoch, args.epochs):
        step, stats = train_one_epoch(args, nets, optimizer, images, aug_gen, epoch, step, steps_per_epoch, device)
        stats = {"epoch": epoch, **stats}
        if args.eval_every and (epoch + 1) % args.eval_every == 0:
            stats["knn_val_auc"] = round(knn_monitor(args, encoder, device, monitor_splits), 4)
        utils.save_checkpoint({**{name: m.state_dict() for name, m in modules.items()},
                               "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step,
                               "rng": utils.rng_state(aug_gen),
                               "meta": {"format": "medssl", "method": "byol", "arch": args.arch,
                                        "stem": args.stem, "in_chans": args.in_chans, "args": vars(args)}},
                              checkpoint_path)
        utils.append_jsonl(os.path.join(args.out, "log.jsonl"), stats)
        print(stats)
    print(f"done: {checkpoint_path}")


if __name__ == "__main__":
    utils.run_main(main)
