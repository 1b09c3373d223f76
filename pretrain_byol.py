"""BYOL and BYOL+ pretraining of an encoder on the train images of a dataset (labels unused).

Paper 001 (Murphy, "Leveraging BYOL for Image Classification in Limited-Labeled Medical Domains"):
ResNet-18, Adam 1e-4, EMA 0.99, batch 256, 1000 epochs on ChestMNIST; BYOL+ adds cutout, contrast
and brightness. BYOL itself: Grill et al. 2020.

    python pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+
    torchrun --nproc_per_node=4 pretrain_byol.py --data chestmnist --epochs 1000 --aug byol+ --sync-bn
"""
from common import cli


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "BYOL"
CPU_CONFIG = "configs/cpu_byol.yaml"
SMOKE_FLAGS = ["--projector-hidden", "32", "--predictor-hidden", "32", "--projector-out", "16", "--aug", "byol"]


def get_args_parser():
    parser = cli.pretrain_parser("BYOL pretraining", __doc__, data_default="chestmnist")
    cli.set_defaults(parser, aug="byol+", epochs=1000, batch_size=256, optimizer="adam", lr=1e-4, weight_decay=1e-6,
                     lr_schedule="constant", warmup_epochs=0, notes={
                         "data": "paper 001: chestmnist",
                         "aug": "byol = Grill et al.'s asymmetric pair, paper001 = what paper 001 used, byol+ = "
                                "paper001 + cutout, contrast, brightness (paper 001 §4.2)",
                         "init": "paper 001: imagenet", "epochs": "paper 001 §5.1: 1000",
                         "batch_size": "paper 001 §5.4: 256", "optimizer": "paper 001: adam",
                         "lr": "paper 001 §5.4: 1e-4", "weight_decay": "paper 001 §5.4: 1e-6",
                         "lr_schedule": "paper 001: constant; Grill et al.: cosine after 10 warm-up epochs"})
    cli.add_ema_flags(parser, momentum=0.99, schedule="constant")
    cli.set_defaults(parser, notes={"ema": "paper 001 §5.1: 0.99; Grill et al.: 0.996",
                                    "ema_schedule": "paper 001: constant"})

    # * BYOL
    g = parser.add_argument_group("BYOL")
    g.add_argument("--projector-hidden", type=int, default=4096,
                   help="projector hidden width (default and paper 001: 4096)")
    g.add_argument("--projector-out", type=int, default=256, help="projection size (default and paper 001: 256)")
    g.add_argument("--predictor-hidden", type=int, default=4096,
                   help="predictor hidden width (default and Grill et al.: 4096)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
import torch.nn.functional as F

from common import dist, ema, models, optim, pretrain


def byol_loss(p, z):
    """2 - 2 cos(p, z), the normalised MSE of Grill et al. 2020 Eq. 2, averaged over the batch.
    `z` is the target's projection: no gradient flows into it."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def forward_loss(online, target, x1, x2, precision):
    """The symmetric BYOL loss of two views (input tensors): both through the online network (encoder,
    projector, predictor) and, without gradient, through the target (its encoder and projector), in the
    run's `precision`. What --compile compiles."""
    with precision.autocast(x1.device.type):
        p1, p2 = online(x1), online(x2)
        with torch.no_grad():
            z1, z2 = target(x1), target(x2)
        # symmetric: each view's prediction regresses the other view's target (Grill et al. Eq. 2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)


def build(args, run):
    # ---- model: online encoder + projector + predictor; target = EMA copy of encoder + projector
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    projector = models.mlp(models.feature_dim(encoder), args.projector_hidden, args.projector_out)
    predictor = models.mlp(args.projector_out, args.predictor_hidden, args.projector_out)
    target_encoder, target_projector = ema.frozen_copy(encoder), ema.frozen_copy(projector)
    modules = {"encoder": encoder, "projector": projector, "predictor": predictor,
               "target_encoder": target_encoder, "target_projector": target_projector}
    # --sync-bn covers the target too: its BatchNorm layers also normalise with batch statistics
    pretrain.place(modules, run)
    online = dist.distributed(torch.nn.Sequential(encoder, projector, predictor), run.device)
    target = torch.nn.Sequential(target_encoder, target_projector)

    # ---- optimiser
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters(),
                                                      *predictor.parameters()], args.lr, args.weight_decay, run.device)
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One BYOL step on a uint8 global batch: lr and momentum for this step, two views, the symmetric
        loss, an optimiser step, then the target's EMA (the same on every rank: DDP keeps the online
        weights the same)."""
        lr = pretrain.set_lr(optimizer, run, i)
        tau = ema.momentum(args.ema_schedule, i, run.total_steps, args.ema)
        x1, x2 = pretrain.two_views(batch, run)
        loss = loss_fn(online, target, x1, x2, run.precision)
        pretrain.optimizer_step(optimizer, loss)
        ema.update(target_encoder, encoder, tau)
        ema.update(target_projector, projector, tau)
        return dist.mean_over_ranks(loss.detach()), {"lr": lr, "ema": tau}

    return pretrain.Method("byol", modules, optimizer, step)


def main():
    pretrain.main("pretrain_byol", get_args_parser, build)


if __name__ == "__main__":
    cli.run_main(main)
