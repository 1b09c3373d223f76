"""SimCLR pretraining of an encoder on the train images of a dataset (labels unused).

SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): two views of every image, a 2-layer MLP projector, and the NT-Xent loss that pulls each
view towards its partner and away from the other 2N - 2 views of the batch. The method medical imaging uses
most (paper 001 §2.1 counts 13 SimCLR papers against 3 for BYOL).

    python pretrain_simclr.py --data pneumoniamnist --epochs 100
    torchrun --nproc_per_node=4 pretrain_simclr.py --data chestmnist --batch-size 1024 --temperature 0.1 --sync-bn
"""
from common import cli


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "SimCLR"
CPU_CONFIG = "configs/cpu_simclr.yaml"
SMOKE_FLAGS = ["--projector-hidden", "32", "--projector-out", "16", "--aug", "simclr"]


def get_args_parser():
    parser = cli.pretrain_parser("SimCLR pretraining", __doc__)
    cli.set_defaults(parser, aug="simclr", epochs=100, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=1e-6,
                     lr_schedule="cosine", warmup_epochs=10, notes={
                         "aug": "simclr: random resized crop, flip, colour jitter of strength 0.8 with p 0.8, "
                                "grayscale p 0.2, blur (Chen et al. App. A)",
                         "epochs": "Chen et al.: 100 to 1000",
                         "batch_size": "every other view in the batch is a negative; Chen et al.: 256 to 8192",
                         "optimizer": "Chen et al.: lars at lr 0.3 x batch / 256",
                         "lr": "for Adam", "weight_decay": "Chen et al.: 1e-6",
                         "lr_schedule": "Chen et al.: cosine", "warmup_epochs": "Chen et al.: 10"})

    # * SimCLR
    g = parser.add_argument_group("SimCLR")
    g.add_argument("--temperature", type=float, default=0.5,
                   help="NT-Xent temperature tau (default 0.5, Chen et al.'s CIFAR-10 setting; 0.1 for "
                        "ImageNet-scale batches of 4096)")
    g.add_argument("--projector-hidden", type=int, default=2048,
                   help="projector hidden width (default 2048: SimCLR's, the ResNet-50 feature width)")
    g.add_argument("--projector-out", type=int, default=128, help="projection size (default and SimCLR: 128)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
import torch.nn.functional as F

from common import dist, models, optim, pretrain


def nt_xent_loss(z1, z2, temperature):
    """NT-Xent (Chen et al. 2020 Eq. 1), averaged over all 2N views: for view i with partner j,
    -log( exp(sim(i, j) / t) / sum_{k != i} exp(sim(i, k) / t) ), sim the cosine similarity. In float32."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def forward_loss(online, x1, x2, temperature, precision):
    """NT-Xent of two views (input tensors) through `online` (encoder + projector, in the run's `precision`),
    over the global batch. What --compile compiles."""
    with precision.autocast(x1.device.type):
        z1, z2 = online(x1), online(x2)
    # every view of the global batch is a negative: gather all ranks' projections (autograd sees the
    # all-gather, so gradients reach each rank's own rows; DDP's mean then gives the one-process gradient)
    return nt_xent_loss(dist.all_rows(z1), dist.all_rows(z2), temperature)


def build(args, run):
    # ---- model: encoder + 2-layer MLP projector (Chen et al. §2.1: the loss is taken after it)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    projector = models.mlp(models.feature_dim(encoder), args.projector_hidden, args.projector_out)
    modules = {"encoder": encoder, "projector": projector}
    pretrain.place(modules, run)
    online = dist.distributed(torch.nn.Sequential(encoder, projector), run.device)

    # ---- optimiser
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters()],
                                     args.lr, args.weight_decay, run.device)
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One SimCLR step on a uint8 global batch: lr, two views, NT-Xent, an optimiser step."""
        lr = pretrain.set_lr(optimizer, run, i)
        x1, x2 = pretrain.two_views(batch, run)
        loss = loss_fn(online, x1, x2, args.temperature, run.precision)
        pretrain.optimizer_step(optimizer, loss)
        return loss.detach(), {"lr": lr}

    return pretrain.Method("simclr", modules, optimizer, step,
                           summary=f"{2 * args.batch_size - 2} negatives per view")


def main():
    pretrain.main("pretrain_simclr", get_args_parser, build)


if __name__ == "__main__":
    cli.run_main(main)
