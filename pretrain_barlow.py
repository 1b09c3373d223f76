"""Barlow Twins pretraining, and "further pretraining" of an already pretrained encoder, on MedMNIST
train images (labels unused, except to oversample a class when asked).

Barlow Twins: Zbontar et al. 2021. Paper 002 (Garcia, Llopart, Rodriguez: Barlow Twins on chest
X-rays): ResNet-18 with 1 input channel, one 512-unit Linear projector, lambda 5e-3, Adam 2e-3
with cosine annealing, batch 128, its augmentation menu. Paper 003 (further pretraining for skin
lesions, §3.7): a pretrained ResNet-50, a new 8192-8192-8192 projector trained alone for one
epoch, then the last bottleneck block (or all layers) with 1cycle at an lr from a range test, and a
sparsity penalty on the projector's last weight.

    python pretrain_barlow.py --config configs/paper002_barlow.yaml          # paper 002
    python pretrain_barlow.py --config configs/paper003_further.yaml --init runs/x/checkpoint.pt
    torchrun --nproc_per_node=4 pretrain_barlow.py --config configs/paper002_barlow.yaml --sync-bn
"""
import argparse
import json
import os

from common import cli, flags
from common.errors import UserError


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "Barlow Twins"
CPU_CONFIG = "configs/cpu_barlow.yaml"
SMOKE_FLAGS = ["--projector", "32-32", "--aug", "base+vflip+noise"]


def number(text):
    """argparse type for lambda: a number or a fraction such as 1/8192."""
    try:
        if "/" in str(text):
            top, bottom = str(text).split("/")
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 1/8192, got {text!r}")


def get_args_parser():
    parser = cli.pretrain_parser("Barlow Twins pretraining", __doc__, data_default="chestmnist")
    cli.set_defaults(parser, aug=flags.PAPER002_MENU, epochs=300, batch_size=128, optimizer="adam", lr=2e-3,
                     weight_decay=1e-5, lr_schedule="cosine", warmup_epochs=0, notes={
                         "data": "paper 002: chest X-rays, e.g. chestmnist",
                         "aug": "default: paper 002's final set; paper002 = the same, paper003 = Barlow Twins' "
                                "asymmetric pair with a 0.7-1 crop and rotation",
                         "init": "also barlowtwins: facebookresearch's ImageNet ResNet-50 via torch.hub, paper 003's "
                                 "SSL base; paper 002: random",
                         "epochs": "paper 002: 300 on ~21k COVID X-rays; paper 003: 100 for the whole encoder",
                         "batch_size": "papers 002 and 003: 128",
                         "optimizer": "paper 002: adam; paper 003's code: adamw (fastai's Adam); Zbontar et al.: "
                                      "lars at 0.2 x batch/256, weight decay 1.5e-6",
                         "lr": "paper 002's scan: 2e-3; or auto: an LR range test picks it (paper 003), writing "
                               "lr_range.json and lr_range.png",
                         "weight_decay": "paper 002's code: 1e-5; Zbontar et al. with LARS: 1.5e-6",
                         "lr_schedule": "paper 002: cosine; paper 003: 1cycle; over the epochs after the frozen ones",
                         "warmup_epochs": "Zbontar et al.: 10"})

    # * Barlow Twins
    g = parser.add_argument_group("Barlow Twins")
    g.add_argument("--lambd", type=number, default=5e-3,
                   help="weight of the redundancy-reduction term (Zbontar et al. and paper 002: 5e-3; "
                        "paper 003's code: 1/8192, i.e. 1 / projector width); fractions like 1/8192 work")
    g.add_argument("--projector", default="512",
                   help="projector layer widths: 512 = one Linear layer (paper 002's best); "
                        "8192-8192-8192 = Linear-BN-ReLU x2 + Linear (Zbontar et al., paper 003)")
    g.add_argument("--sparsity", type=float, default=0.0,
                   help="weight alpha of the sparsity penalty on the projector's last weight, added to the "
                        "loss (paper 003 Eq. 2: 0.01; 0 = off, paper 002)")
    g.add_argument("--sparsity-norm", default="l1", choices=["l1", "l21"],
                   help="l1 = sum of |w| (paper 003's text); l21 = sum of the L2 norms of the weight's "
                        "columns, one per input unit (what paper 003's code computes)")
    g.add_argument("--oversample", default=None, metavar="CLASS:FACTOR",
                   help="repeat the train images of a class FACTOR times in every epoch, e.g. 1:10 (paper 003 "
                        "§4.5 oversampled its rare class 10:1); several joined by commas; one --data only")
    g.add_argument("--lr-biases", type=float, default=None, metavar="LR",
                   help="peak lr of the biases and BatchNorm parameters under --optimizer lars, on --lr's schedule "
                        "(Zbontar et al.: 0.0048 x batch/256 beside 0.2 x batch/256 for the weights; default: "
                        f"{flags.BARLOW_BIAS_LR_RATIO:g} x --lr, their ratio)")
    g.add_argument("--lr-range", type=float, nargs=3, default=[1e-7, 10.0, 100], metavar=("START", "END", "STEPS"),
                   help="sweep of --lr auto: lr from START to END over STEPS steps (fastai's lr_find: 1e-7 10 100)")

    # * Further pretraining (paper 003 §3.7)
    g = parser.add_argument_group("further pretraining (paper 003 §3.7)")
    g.add_argument("--freeze-encoder-epochs", type=int, default=0,
                   help="first epochs that train the projector alone, encoder frozen (paper 003: 1)")
    g.add_argument("--freeze-lr", type=float, default=None,
                   help="constant lr of those epochs (default: --lr; paper 003: a fixed Adam lr)")
    g.add_argument("--trainable", default="all", choices=["all", "layer4", "last-block"],
                   help="encoder part trained after them: all, layer4, or last-block = the last residual "
                        "block (paper 003's SSLp: the final 1x1-3x3-1x1 bottleneck of a ResNet-50)")
    g.add_argument("--frozen-bn", default="eval", choices=["eval", "train"],
                   help="BatchNorm in frozen parts: eval = running statistics used and left untouched "
                        "(default); train = batch statistics, running statistics updated; their affine "
                        "weights stay frozen either way (fastai, paper 003's code, also trains those)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch

from common import data, dist, figures, models, optim, pretrain, rundir


def barlow_twins_loss(z1, z2, lambd):
    """Zbontar et al. 2021 Eq. 1: standardise each embedding dimension along the batch, take the
    cross-correlation matrix C = z1n^T z2n / N, and return sum_i (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2.
    Computed in float32 outside autocast. No scaling besides lambd (Zbontar et al.'s code:
    on-diagonal + lambd x off-diagonal)."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        n = z1.shape[0]
        # BatchNorm1d(affine=False) in training mode, as Zbontar et al.: biased variance, eps 1e-5
        z1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
        z2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
        c = z1.T @ z2 / n
        diagonal = torch.diagonal(c)
        invariance = (1 - diagonal).pow(2).sum()
        redundancy = c.pow(2).sum() - diagonal.pow(2).sum()
        return invariance + lambd * redundancy


def sparsity_penalty(weight, norm):
    """Paper 003 Eq. 2's penalty on the projector's last weight (out x in, torch's layout): "l1" =
    sum |w_ij|; "l21" = sum over the input units j of the L2 norm of column w_:j, the group-sparse
    norm paper 003's code computes under the name L1."""
    if norm == "l1":
        return weight.abs().sum()
    if norm == "l21":
        return weight.norm(dim=0).sum()
    raise ValueError(f"unknown sparsity norm {norm!r}")


def oversample_index(labels, spec):
    """Indices into the corpus, with the images of each CLASS repeated FACTOR times ("1:10" or
    "0:2,1:10")."""
    index = torch.arange(len(labels), device=labels.device)
    if labels.ndim > 1:
        raise UserError("--oversample needs single-label data; this dataset is multi-label")
    parts = [index]
    for item in str(spec).split(","):
        try:
            cls, factor = (int(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"--oversample {spec!r}: expected CLASS:FACTOR, e.g. 1:10")
        members = (labels == cls).nonzero().flatten()
        if factor < 1 or len(members) == 0:
            raise UserError(f"--oversample {item}: class {cls} has {len(members)} images and the factor "
                            f"must be >= 1")
        parts += [members] * (factor - 1)
    return torch.cat(parts)


def set_phase(args, encoder, epoch):
    """Which part of the encoder trains in this epoch (paper 003 §3.7): none during the first
    --freeze-encoder-epochs, then --trainable. Returns the encoder's trainable parameter count."""
    return models.set_trainable(encoder, "none" if epoch < args.freeze_encoder_epochs else args.trainable)


def set_train_mode(args, encoder, projector):
    encoder.train()
    projector.train()
    if args.frozen_bn == "eval":
        models.frozen_bn_eval(encoder)


def forward_loss(online, projector, x1, x2, lambd, sparsity, sparsity_norm, precision):
    """Barlow Twins loss (plus the sparsity penalty on `projector`) of two views (input tensors): `online`
    (encoder + projector, in DDP under torchrun) on this rank's rows of each (in the run's `precision`), the
    loss over the whole batch in float32, the same on every rank. What --compile compiles."""
    with precision.autocast(x1.device.type):
        z1, z2 = online(x1), online(x2)
    # the loss standardises along the batch: gather the global batch's embeddings (gradients reach
    # every rank's own rows; DDP's mean over ranks then gives the one-process gradient)
    loss = barlow_twins_loss(dist.all_rows(z1), dist.all_rows(z2), lambd)
    if sparsity:
        loss = loss + sparsity * sparsity_penalty(projector[-1].weight, sparsity_norm)
    return loss


def lr_at(args, optimizer, step, steps_per_epoch, lr):
    """Set this step's lr: constant --freeze-lr (default `lr`) while the encoder is frozen (paper 003 §3.7),
    then --lr-schedule from `lr` over the epochs after the frozen ones. Returns the lr."""
    frozen_epochs = args.freeze_encoder_epochs
    if step < frozen_epochs * steps_per_epoch:
        return optim.schedule_step(optimizer, "constant", 0, 1, args.freeze_lr or lr)
    return optim.schedule_step(optimizer, args.lr_schedule, step - frozen_epochs * steps_per_epoch,
                               (args.epochs - frozen_epochs) * steps_per_epoch, lr,
                               args.warmup_epochs * steps_per_epoch, args.final_lr_fraction)


def start_phase(args, encoder, projector, online, device, epoch):
    """Before each epoch: which part of the encoder trains (set_phase) and the train/eval modes. DDP
    syncs the gradients of the parameters trainable when it is built, so `online` (a one-item list) is
    rebuilt when that set changes, and only then. Returns the epoch's figures."""
    trainable = set_phase(args, encoder, epoch)
    set_train_mode(args, encoder, projector)
    if not online or epoch == args.freeze_encoder_epochs:
        online[:] = [dist.distributed(torch.nn.Sequential(encoder, projector), device)]
    return {"frozen_encoder": epoch < args.freeze_encoder_epochs,
            "trainable_params": trainable + sum(p.numel() for p in projector.parameters())}


def lr_from_range_test(args, encoder, projector, run):
    """--lr auto: an LR range test on the part trained after the frozen epochs, from the initial
    weights (restored afterwards), with its own seeded generator so that the run's own random
    draws are those of a run given the found lr. Every rank takes part, as in training; rank 0
    writes lr_range.json and lr_range.png."""
    set_phase(args, encoder, args.freeze_encoder_epochs)
    set_train_mode(args, encoder, projector)
    online = dist.distributed(torch.nn.Sequential(encoder, projector), run.device)
    params = [p for p in [*encoder.parameters(), *projector.parameters()] if p.requires_grad]
    optimizer = optim.make_optimizer(args.optimizer, params, args.lr_range[0], args.weight_decay,
                                     bias_lr_ratio=optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases))
    gen = torch.Generator(run.device).manual_seed(args.seed + 1)

    def batch_loss():
        pick = torch.randint(len(run.index), (args.batch_size,), generator=gen, device=run.index.device)
        x1, x2 = pretrain.two_views(run.images[run.index[pick]], run, generator=gen)
        return forward_loss(online, projector, x1, x2, args.lambd, args.sparsity, args.sparsity_norm, run.precision)
    start, end, steps = args.lr_range
    lrs, losses, lr = optim.lr_range_test(batch_loss, optimizer, [encoder, projector], start, end, int(steps))
    if dist.is_main():
        rundir.atomic_write_text(os.path.join(args.out, "lr_range.json"),
                                json.dumps({"lrs": lrs, "losses": losses, "chosen": lr}))
        figures.plot_lr_range(lrs, losses, lr, os.path.join(args.out, "lr_range.png"),
                              title=f"LR range test ({args.optimizer}, {args.trainable})")
    print(f"LR range test: lr {lr:.3g} chosen from {len(lrs)} steps ({start:g} to {lrs[-1]:.3g})")
    return lr


def check(args):
    """Refusals of this method's flags, before the run directory is touched."""
    if args.freeze_encoder_epochs < 0 or args.freeze_encoder_epochs >= args.epochs:
        raise UserError(f"--freeze-encoder-epochs must be in [0, --epochs), got {args.freeze_encoder_epochs} "
                        f"with --epochs {args.epochs}")
    if args.init == "barlowtwins" and args.arch != "resnet50":
        raise UserError("--init barlowtwins is facebookresearch's ImageNet ResNet-50; add --arch resnet50")
    models.projector_sizes(args.projector)
    optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases)  # refuses --lr-biases without LARS
    if args.oversample and "," in args.data:
        raise UserError("--oversample takes one --data flag (class numbers differ between datasets)")


def build(args, run):
    # ---- data: an index list to sample from, a class repeated when --oversample asks
    if args.oversample:
        labels = data.load_split(args.data, "train", args.size, args.data_root, run.device, args.in_chans).labels
        run.index = oversample_index(labels, args.oversample)
        run.steps_per_epoch = pretrain.steps_per_epoch(len(run.index), args.batch_size, args.max_steps)

    # ---- model: encoder + projector (a new projector also when the encoder is pretrained, §3.7)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    projector = models.projector(models.feature_dim(encoder), args.projector)
    modules = {"encoder": encoder, "projector": projector}
    pretrain.place(modules, run)

    # ---- learning rate: given, or found by a range test now; a resumed run gets the lr it found back
    # from its checkpoint, as the method's state (its range test is not run again)
    state = {"lr": args.lr}
    if args.lr == "auto":
        state["lr"] = 0.0 if run.state is not None else lr_from_range_test(args, encoder, projector, run)

    # ---- optimiser: one over every parameter; frozen ones have no gradient and are skipped
    bias_lr_ratio = optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases)
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters()],
                                     state["lr"], args.weight_decay, run.device, bias_lr_ratio)
    online = []  # built by start_phase, rebuilt when the trainable part changes
    # --compile: a new graph at the phase change (other parameters trainable, a new module), then none
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One Barlow Twins step on a uint8 global batch: lr, two views, the loss, an optimiser step. The
        loss is the global batch's, the same on every rank."""
        lr = lr_at(args, optimizer, i, run.steps_per_epoch, state["lr"])
        x1, x2 = pretrain.two_views(batch, run)
        loss = loss_fn(online[0], projector, x1, x2, args.lambd, args.sparsity, args.sparsity_norm, run.precision)
        pretrain.optimizer_step(optimizer, loss)
        return loss.detach(), {"lr": lr}

    found = "found by the range test" if args.lr == "auto" else "given"
    lr_note = (f"lr {state['lr']:.3g} ({found})" if state["lr"] else "lr from the checkpoint's range test")
    summary = (f"encoder trainable: {args.trainable} after {args.freeze_encoder_epochs} frozen epoch(s), {lr_note}"
               + (f", biases and BN at {bias_lr_ratio:.3g} x lr" if args.optimizer == "lars" else ""))
    return pretrain.Method("barlow", modules, optimizer, step, state=state, summary=summary,
                           start_epoch=lambda epoch: start_phase(args, encoder, projector, online, run.device, epoch))


def main():
    pretrain.main("pretrain_barlow", get_args_parser, build, check=check, lr_auto=True)


if __name__ == "__main__":
    cli.run_main(main)
