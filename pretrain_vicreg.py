"""VICReg pretraining of an encoder on the train images of a dataset (labels unused).

VICReg (Bardes, Ponce, LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning"): two views of every image through one encoder and an expander, and a loss of three
terms on the two embeddings: invariance (their mean squared distance), variance (a hinge keeping each
dimension's standard deviation along the batch at 1 or more, which prevents collapse without negatives or a
momentum encoder) and covariance (decorrelating the dimensions). Their ImageNet recipe: ResNet-50, an
8192-8192-8192 expander, LARS at 0.2 x batch/256 with weight decay 1e-6, batch 2048, 10 warm-up epochs
then cosine to 0.001 x the peak, BYOL's augmentations, 1000 epochs.

    python pretrain_vicreg.py --config configs/vicreg.yaml          # the paper's recipe (a GPU's)
    python pretrain_vicreg.py --config configs/cpu_vicreg.yaml      # a CPU-scale one, PneumoniaMNIST 28 px
    torchrun --nproc_per_node=4 pretrain_vicreg.py --config configs/vicreg.yaml --sync-bn
"""
from common import cli


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "VICReg"
CPU_CONFIG = "configs/cpu_vicreg.yaml"
SMOKE_FLAGS = ["--expander", "32-32", "--aug", "base"]


def get_args_parser():
    parser = cli.pretrain_parser("VICReg pretraining", __doc__)
    cli.set_defaults(parser, aug="byol", epochs=1000, batch_size=2048, optimizer="lars", lr=1.6, weight_decay=1e-6,
                     lr_schedule="cosine", warmup_epochs=10, final_lr_fraction=0.001, notes={
                         "aug": "Bardes et al.: byol (Grill et al.'s asymmetric pair)",
                         "arch": "Bardes et al.: resnet50",
                         "epochs": "Bardes et al.: 1000",
                         "batch_size": "Bardes et al.: 2048",
                         "optimizer": "Bardes et al.: lars, biases and BatchNorm at the weights' lr",
                         "lr": "Bardes et al.: 0.2 x batch/256, 1.6 at batch 2048",
                         "weight_decay": "Bardes et al.: 1e-6",
                         "lr_schedule": "Bardes et al.: cosine", "warmup_epochs": "Bardes et al.: 10",
                         "final_lr_fraction": "Bardes et al.'s code: 0.001"})

    # * VICReg
    g = parser.add_argument_group("VICReg")
    g.add_argument("--invariance-weight", type=float, default=25.0,
                   help="weight lambda of the invariance term, the mean squared error between the two views' "
                        "embeddings (Bardes et al.: 25)")
    g.add_argument("--variance-weight", type=float, default=25.0,
                   help="weight mu of the variance term, the hinge max(0, 1 - std) on each dimension's standard "
                        "deviation along the batch (Bardes et al.: 25)")
    g.add_argument("--covariance-weight", type=float, default=1.0,
                   help="weight nu of the covariance term, the squared off-diagonal covariances / dimension "
                        "(Bardes et al.: 1)")
    g.add_argument("--expander", default="8192-8192-8192",
                   help="expander layer widths: 8192-8192-8192 = Linear-BN-ReLU x2 + Linear (default and "
                        "Bardes et al.); one width = one Linear layer")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
import torch.nn.functional as F

from common import dist, models, optim, pretrain


def vicreg_terms(z, eps=1e-4):
    """The variance and covariance terms of one view's embeddings z (n, d), Bardes et al. §3:
    v = mean_j max(0, 1 - sqrt(Var(z_j) + eps)) (gamma = 1) and c = sum_{i != j} C_ij^2 / d, with C the
    covariance matrix along the batch; both with the unbiased (n - 1) variance, as their code."""
    n, d = z.shape
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1 - std).mean()
    cov = z.T @ z / (n - 1)
    covariance = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return variance, covariance


def vicreg_loss(z1, z2, invariance_weight, variance_weight, covariance_weight):
    """VICReg's loss of two views' embeddings (n, d), as Bardes et al.'s code computes it: lambda x the
    mean squared error over all n x d entries + mu x the mean of the two views' variance terms + nu x
    the sum of their covariance terms. In float32 outside autocast."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        variance1, covariance1 = vicreg_terms(z1)
        variance2, covariance2 = vicreg_terms(z2)
        return (invariance_weight * invariance + variance_weight * (variance1 + variance2) / 2
                + covariance_weight * (covariance1 + covariance2))


def forward_loss(online, x1, x2, invariance_weight, variance_weight, covariance_weight, precision):
    """VICReg's loss of two views (input tensors) through `online` (encoder + expander, in the run's
    `precision`), over the global batch. What --compile compiles."""
    with precision.autocast(x1.device.type):
        z1, z2 = online(x1), online(x2)
    # variance and covariance are statistics along the batch: gather the global batch's embeddings
    # (gradients reach every rank's own rows; DDP's mean over ranks then gives the one-process gradient)
    return vicreg_loss(dist.all_rows(z1), dist.all_rows(z2), invariance_weight, variance_weight, covariance_weight)


def check(args):
    """Refusals of this method's flags, before the run directory is touched."""
    models.projector_sizes(args.expander, "--expander")


def build(args, run):
    # ---- model: encoder + expander (the loss is taken on the expander's output, Bardes et al. §3)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    expander = models.projector(models.feature_dim(encoder), args.expander)
    modules = {"encoder": encoder, "expander": expander}
    pretrain.place(modules, run)
    online = dist.distributed(torch.nn.Sequential(encoder, expander), run.device)

    # ---- optimiser: under LARS the biases and BatchNorm parameters keep the weights' lr (Bardes et al.'s
    # code; Barlow Twins lowers theirs), without weight decay or the LARS scaling
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *expander.parameters()],
                                     args.lr, args.weight_decay, run.device, bias_lr_ratio=1.0)
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One VICReg step on a uint8 global batch: lr, two views, the loss, an optimiser step."""
        lr = pretrain.set_lr(optimizer, run, i)
        x1, x2 = pretrain.two_views(batch, run)
        loss = loss_fn(online, x1, x2, args.invariance_weight, args.variance_weight, args.covariance_weight,
                       run.precision)
        pretrain.optimizer_step(optimizer, loss)
        return loss.detach(), {"lr": lr}

    return pretrain.Method("vicreg", modules, optimizer, step,
                           summary=f"expander {args.expander}, weights {args.invariance_weight:g} / "
                                   f"{args.variance_weight:g} / {args.covariance_weight:g}")


def main():
    pretrain.main("pretrain_vicreg", get_args_parser, build, check=check)


if __name__ == "__main__":
    cli.run_main(main)
