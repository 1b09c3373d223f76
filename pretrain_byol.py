"""BYOL and BYOL+ pretraining of a ResNet encoder on the train images of a dataset (labels unused).

Paper 001 (Murphy, "Leveraging BYOL for Image Classification in Limited-Labeled Medical Domains"):
ResNet-18, Adam 1e-4, EMA 0.99, batch 256, 1000 epochs on ChestMNIST; BYOL+ adds cutout, contrast
and brightness. BYOL itself: Grill et al. 2020.

    python pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+
    torchrun --nproc_per_node=4 pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+ --sync-bn
"""
import argparse
import copy
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import augment, cli, data, dist, models, optim, pretrain


def get_args_parser():
    parser = argparse.ArgumentParser("BYOL pretraining", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, data_help="dataset(s) whose train images are the unlabeled corpus: MedMNIST 2D "
                         "flags, .npz files, folders or CSV manifests (docs/DATA.md), several joined by commas "
                         "(paper 001: chestmnist)")
    parser.set_defaults(data="chestmnist", arch="resnet18", stem="imagenet", in_chans=3)

    # * BYOL
    g = parser.add_argument_group("BYOL")
    g.add_argument("--aug", default="byol+", type=augment.checked_spec,
                   help="view augmentations, a preset or paper 002's menu string (default byol+): byol = Grill et "
                        "al.'s asymmetric pair, paper001 = what paper 001 used, byol+ = paper001 + cutout, "
                        "contrast, brightness (paper 001 §4.2)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: the preset's, 0.08 1 as in BYOL; "
                        "small images may want a larger MIN)")
    g.add_argument("--projector-hidden", type=int, default=4096,
                   help="projector hidden width (default and paper 001: 4096)")
    g.add_argument("--projector-out", type=int, default=256, help="projection size (default and paper 001: 256)")
    g.add_argument("--predictor-hidden", type=int, default=4096,
                   help="predictor hidden width (default and Grill et al.: 4096)")
    g.add_argument("--ema", type=float, default=0.99, help="target EMA decay tau (default and paper 001 §5.1: 0.99)")
    g.add_argument("--ema-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant tau (default, paper 001) or cosine from tau to 1 over training (Grill et al. §3.2)")

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--init", default="random",
                   help="random | imagenet | <checkpoint or .pth> (default random; paper 001: imagenet)")
    g.add_argument("--epochs", type=int, default=1000, help="epochs (default and paper 001 §5.1: 1000)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, split evenly over torchrun's processes (default and paper 001 §5.4: 256)")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default and paper 001 §5.4: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-6,
                   help="Adam weight decay (default and paper 001 §5.4: 1e-6)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (default, paper 001) or cosine decay to 0 after --warmup-epochs")
    g.add_argument("--warmup-epochs", type=int, default=0,
                   help="linear warm-up epochs for --lr-schedule cosine (default 0)")
    cli.add_pretrain_flags(parser)
    # what --compile covers differs between the methods: its help says it
    return parser


def byol_loss(p, z):
    """2 - 2 cos(p, z), the normalised MSE of Grill et al. 2020 Eq. 2, averaged over the batch.
    `z` is the target's projection: no gradient flows into it."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


@torch.no_grad()
def update_target(target, online, tau):
    """target <- tau * target + (1 - tau) * online, once per optimiser step (Grill et al. Eq. 1), as a few
    foreach kernels rather than one per tensor. BatchNorm's running statistics are copied, not averaged: the
    target normalises with batch statistics in training, so they never enter the loss, and a copy keeps them
    those of the images the weights were trained on, should the target encoder be evaluated."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(online.buffers()))


class Networks(NamedTuple):
    online: torch.nn.Module          # encoder + projector + predictor (in DDP under torchrun)
    encoder: torch.nn.Module
    projector: torch.nn.Module
    target_encoder: torch.nn.Module  # EMA copies of encoder and projector; never trained directly
    target_projector: torch.nn.Module


def forward_loss(nets, x1, x2):
    """The symmetric BYOL loss of two views (input tensors): both through the online network and, without
    gradient, through the target (bf16 autocast on CUDA). What --compile compiles."""
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=x1.device.type == "cuda"):
        p1, p2 = nets.online(x1), nets.online(x2)
        with torch.no_grad():
            z1 = nets.target_projector(nets.target_encoder(x1))
            z2 = nets.target_projector(nets.target_encoder(x2))
        # symmetric: each view's prediction regresses the other view's target (Grill et al. Eq. 2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)


def train_step(args, nets, optimizer, views, aug_gen, steps_per_epoch, batch, step, loss_fn=forward_loss):
    """One BYOL step on a uint8 global batch: lr and tau for this step, two views, the symmetric loss
    (`loss_fn`: forward_loss, or its compiled form under --compile), an Adam step, the target's EMA.
    Returns the global batch's loss and the step's figures."""
    total_steps = args.epochs * steps_per_epoch
    lr = optim.learning_rate(args.lr_schedule, step, total_steps, args.lr, args.warmup_epochs * steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tau = args.ema if args.ema_schedule == "constant" else optim.cosine(step, total_steps, args.ema, 1.0)
    # every rank augments the whole global batch and keeps its own rows: an image's views do not
    # depend on the number of processes, and aug_gen stays in step on every rank
    x1, x2 = (data.to_input(dist.my_rows(v), args.in_chans).contiguous(memory_format=torch.channels_last)
              for v in augment.two_views(batch, views, aug_gen))
    loss = loss_fn(nets, x1, x2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # the same on every rank: an EMA of the online weights, which DDP keeps the same
    update_target(nets.target_encoder, nets.encoder, tau)
    update_target(nets.target_projector, nets.projector, tau)
    return dist.mean_over_ranks(loss.detach()), {"lr": lr, "ema": tau}


def main():
    args = cli.parse_args(get_args_parser())

    # ---- data: the train split(s), whole, as uint8 on the device; the run directory, resumed if unfinished
    run = pretrain.setup("pretrain_byol", vars(args), args.device)

    # ---- model: online encoder + projector + predictor; target = EMA copy of encoder + projector
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans)
    projector = models.mlp(models.FEATURE_DIM[args.arch], args.projector_hidden, args.projector_out)
    predictor = models.mlp(args.projector_out, args.predictor_hidden, args.projector_out)
    target_encoder, target_projector = copy.deepcopy(encoder), copy.deepcopy(projector)
    modules = {"encoder": encoder, "projector": projector, "predictor": predictor,
               "target_encoder": target_encoder, "target_projector": target_projector}
    # --sync-bn covers the target too: its BatchNorm layers also normalise with batch statistics
    pretrain.place(modules, run.device, args.sync_bn)
    for p in [*target_encoder.parameters(), *target_projector.parameters()]:
        p.requires_grad_(False)
    online = dist.distributed(torch.nn.Sequential(encoder, projector, predictor), run.device)
    nets = Networks(online, encoder, projector, target_encoder, target_projector)

    # ---- optimiser
    params = [*encoder.parameters(), *projector.parameters(), *predictor.parameters()]
    optimizer = optim.adam(params, args.lr, args.weight_decay, run.device)
    print(f"{len(run.images)} images, {run.steps_per_epoch} steps/epoch, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters"
          + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))

    # ---- loop: common/pretrain.py (resume, checkpoints, log, kNN monitor)
    loss_fn = pretrain.compile_loss(forward_loss, run.device) if args.compile else forward_loss
    step = functools.partial(train_step, args, nets, optimizer, run.views, run.generator, run.steps_per_epoch,
                             loss_fn=loss_fn)
    method = pretrain.Method("byol", modules, optimizer, step)
    pretrain.train(method, run)


if __name__ == "__main__":
    cli.run_main(main)
