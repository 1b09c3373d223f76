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
import functools
import json
import os

import torch

from common import augment, cli, data, dist, metrics, models, optim, pretrain, rundir
from common.cli import UserError


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
    parser = argparse.ArgumentParser("Barlow Twins pretraining", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, data_help="dataset(s) whose train images are the unlabeled corpus: MedMNIST 2D "
                         "flags, .npz files, folders or CSV manifests (docs/DATA.md), several joined by commas "
                         "(paper 002: chest X-rays, e.g. chestmnist)")
    parser.set_defaults(data="chestmnist", arch="resnet18", stem="imagenet", in_chans=3)

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
    g.add_argument("--aug", default=augment.PAPER002_MENU, type=augment.checked_spec,
                   help=f"views: a menu of {'+'.join(augment.MENU)} joined by '+', applied in that order with "
                        f"paper 002's values (default: its final set), or a preset: paper002 (the same), "
                        f"paper003 (Barlow Twins' asymmetric pair with a 0.7-1 crop and rotation), or any other of "
                        f"{', '.join(n for n in augment.NAMES if n not in ('paper002', 'paper003'))}")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: the preset's; 0.08 1 in paper 002's base)")
    g.add_argument("--oversample", default=None, metavar="CLASS:FACTOR",
                   help="repeat the train images of a class FACTOR times in every epoch, e.g. 1:10 (paper 003 "
                        "§4.5 oversampled its rare class 10:1); several joined by commas; one --data only")

    # * Further pretraining (paper 003 §3.7)
    g = parser.add_argument_group("further pretraining (paper 003 §3.7)")
    g.add_argument("--init", default="random",
                   help="random | imagenet | barlowtwins (facebookresearch's ImageNet ResNet-50 via torch.hub; "
                        "paper 003's SSL base) | <checkpoint.pt or .pth> (paper 002: random)")
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

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "lars"],
                   help="adam (paper 002); adamw (decoupled weight decay: fastai's Adam, as paper 003's code "
                        "ran it); lars (Zbontar et al.: lr 0.2 x batch/256, biases and BN at --lr-biases, weight decay 1.5e-6)")
    g.add_argument("--epochs", type=int, default=300,
                   help="epochs (paper 002: 300 on ~21k COVID X-rays; paper 003: 100 for the whole encoder)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch size, split evenly over torchrun's processes (papers 002 and 003: 128)")
    g.add_argument("--lr", type=cli.lr_or_auto, default=2e-3,
                   help="peak learning rate (paper 002's scan: 2e-3), or auto: an LR range test picks it "
                        "(paper 003), writing lr_range.json and lr_range.png")
    g.add_argument("--lr-biases", type=float, default=None, metavar="LR",
                   help="peak lr of the biases and BatchNorm parameters under --optimizer lars, on --lr's schedule "
                        "(Zbontar et al.: 0.0048 x batch/256 beside 0.2 x batch/256 for the weights; default: "
                        f"{optim.BARLOW_BIAS_LR_RATIO:g} x --lr, their ratio)")
    g.add_argument("--lr-range", type=float, nargs=3, default=[1e-7, 10.0, 100], metavar=("START", "END", "STEPS"),
                   help="sweep of --lr auto: lr from START to END over STEPS steps (fastai's lr_find: 1e-7 10 100)")
    g.add_argument("--lr-schedule", default="cosine", choices=list(optim.LR_SCHEDULES),
                   help="cosine = cosine annealing to 0 (paper 002); 1cycle = fastai's one-cycle, up to --lr and "
                        "down again (paper 003); constant; step = x0.1 at 50%% and 75%% of the epochs; linear = "
                        "linear decay to 0; over the epochs after the frozen ones")
    g.add_argument("--warmup-epochs", type=int, default=0,
                   help="linear warm-up epochs for --lr-schedule cosine (Zbontar et al.: 10)")
    g.add_argument("--weight-decay", type=float, default=1e-5,
                   help="weight decay (paper 002's code: 1e-5; Zbontar et al. with LARS: 1.5e-6)")

    cli.add_pretrain_flags(parser)
    # what --compile covers differs between the methods: its help says it
    return parser


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


def forward_loss(args, online, projector, x1, x2):
    """Barlow Twins loss (plus the sparsity penalty on `projector`) of two views (input tensors): `online`
    (encoder + projector, in DDP under torchrun) on this rank's rows of each (bf16 autocast on CUDA), the
    loss over the whole batch in float32, the same on every rank. What --compile compiles."""
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=x1.device.type == "cuda"):
        z1, z2 = online(x1), online(x2)
    # the loss standardises along the batch: gather the global batch's embeddings (gradients reach
    # every rank's own rows; DDP's mean over ranks then gives the one-process gradient)
    loss = barlow_twins_loss(dist.all_rows(z1), dist.all_rows(z2), args.lambd)
    if args.sparsity:
        loss = loss + args.sparsity * sparsity_penalty(projector[-1].weight, args.sparsity_norm)
    return loss


def step_loss(args, online, projector, batch, views, aug_gen, loss_fn=forward_loss):
    """The loss of one uint8 global batch: its two augmented views, then `loss_fn` (forward_loss, or its
    compiled form) on them."""
    # every rank augments the whole batch and keeps its own rows: an image's views do not depend on
    # the number of processes, and aug_gen stays in step on every rank
    x1, x2 = (data.to_input(dist.my_rows(v), args.in_chans).contiguous(memory_format=torch.channels_last)
              for v in augment.two_views(batch, views, aug_gen))
    return loss_fn(args, online, projector, x1, x2)


def lr_at(args, optimizer, step, steps_per_epoch):
    """Set this step's lr: constant --freeze-lr while the encoder is frozen (paper 003 §3.7), then
    --lr-schedule over the epochs after the frozen ones. Returns the lr."""
    frozen_epochs = args.freeze_encoder_epochs
    if step < frozen_epochs * steps_per_epoch:
        return optim.schedule_step(optimizer, "constant", 0, 1, args.freeze_lr)
    return optim.schedule_step(optimizer, args.lr_schedule, step - frozen_epochs * steps_per_epoch,
                               (args.epochs - frozen_epochs) * steps_per_epoch, args.lr,
                               args.warmup_epochs * steps_per_epoch)


def train_step(args, online, projector, optimizer, views, aug_gen, steps_per_epoch, batch, step,
               loss_fn=forward_loss):
    """One Barlow Twins step on a uint8 global batch (`loss_fn`: forward_loss, or its compiled form under
    --compile). Returns its loss and the step's lr."""
    lr = lr_at(args, optimizer, step, steps_per_epoch)
    loss = step_loss(args, online[0], projector, batch, views, aug_gen, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), {"lr": lr}  # the global batch's loss, the same on every rank


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


def lr_from_range_test(args, encoder, projector, images, index, device):
    """--lr auto: an LR range test on the part trained after the frozen epochs, from the initial
    weights (restored afterwards), with its own seeded generator so that the run's own random
    draws are those of a run given the found lr. Every rank takes part, as in training; rank 0
    writes lr_range.json and lr_range.png."""
    set_phase(args, encoder, args.freeze_encoder_epochs)
    set_train_mode(args, encoder, projector)
    online = dist.distributed(torch.nn.Sequential(encoder, projector), device)
    params = [p for p in [*encoder.parameters(), *projector.parameters()] if p.requires_grad]
    optimizer = optim.make_optimizer(args.optimizer, params, args.lr_range[0], args.weight_decay,
                                     bias_lr_ratio=optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases))
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    views = augment.views(args.aug, args.crop_scale)

    def batch_loss():
        pick = torch.randint(len(index), (args.batch_size,), generator=gen, device=index.device)
        return step_loss(args, online, projector, images[index[pick]], views, gen)
    start, end, steps = args.lr_range
    lrs, losses, lr = optim.lr_range_test(batch_loss, optimizer, [encoder, projector], start, end, int(steps))
    if dist.is_main():
        rundir.atomic_write_text(os.path.join(args.out, "lr_range.json"),
                                json.dumps({"lrs": lrs, "losses": losses, "chosen": lr}))
        metrics.plot_lr_range(lrs, losses, lr, os.path.join(args.out, "lr_range.png"),
                              title=f"LR range test ({args.optimizer}, {args.trainable})")
    print(f"LR range test: lr {lr:.3g} chosen from {len(lrs)} steps ({start:g} to {lrs[-1]:.3g})")
    return lr


def main():
    args = cli.parse_args(get_args_parser())
    if args.freeze_encoder_epochs < 0 or args.freeze_encoder_epochs >= args.epochs:
        raise UserError(f"--freeze-encoder-epochs must be in [0, --epochs), got {args.freeze_encoder_epochs} "
                        f"with --epochs {args.epochs}")
    if args.init == "barlowtwins" and args.arch != "resnet50":
        raise UserError("--init barlowtwins is facebookresearch's ImageNet ResNet-50; add --arch resnet50")
    models.projector_sizes(args.projector)
    optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases)  # refuses --lr-biases without LARS
    if args.oversample and "," in args.data:
        raise UserError("--oversample takes one --data flag (class numbers differ between datasets)")

    # ---- data: the train split(s), whole, as uint8 on the device; an index list to sample from
    run = pretrain.setup("pretrain_barlow", vars(args), args.device)
    if args.oversample:
        labels = data.load_split(args.data, "train", args.size, args.data_root, run.device, args.in_chans).labels
        run.index = oversample_index(labels, args.oversample)
        run.steps_per_epoch = pretrain.steps_per_epoch(len(run.index), args.batch_size, args.max_steps)

    # ---- model: encoder + projector (a new projector also when the encoder is pretrained, §3.7)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans)
    projector = models.projector(models.FEATURE_DIM[args.arch], args.projector)
    modules = {"encoder": encoder, "projector": projector}
    pretrain.place(modules, run.device, args.sync_bn)

    # ---- learning rate: given, found by a range test now, or the one a resumed run found
    if args.lr == "auto":
        args.lr = run.state["lr"] if run.state is not None else lr_from_range_test(
            args, encoder, projector, run.images, run.index, run.device)
    if args.freeze_lr is None:
        args.freeze_lr = args.lr

    # ---- optimiser: one over every parameter; frozen ones have no gradient and are skipped
    bias_lr_ratio = optim.lars_bias_lr_ratio(args.optimizer, args.lr, args.lr_biases)
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters()],
                                     args.lr, args.weight_decay, run.device, bias_lr_ratio)
    print(f"{len(run.index)} images per epoch, {run.steps_per_epoch} steps/epoch, encoder trainable: "
          f"{args.trainable} after {args.freeze_encoder_epochs} frozen epoch(s), lr {args.lr:.3g}"
          + (f" (biases and BN: {args.lr * bias_lr_ratio:.3g})" if args.optimizer == "lars" else "")
          + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))

    # ---- loop: common/pretrain.py (resume, checkpoints, log, kNN monitor)
    online = []  # built by start_phase, rebuilt when the trainable part changes
    # --compile: a new graph at the phase change (other parameters trainable, a new module), then none
    loss_fn = pretrain.compile_loss(forward_loss, run.device) if args.compile else forward_loss
    step = functools.partial(train_step, args, online, projector, optimizer, run.views, run.generator,
                             run.steps_per_epoch, loss_fn=loss_fn)
    phase = functools.partial(start_phase, args, encoder, projector, online, run.device)
    method = pretrain.Method("barlow", modules, optimizer, step, start_epoch=phase, saved={"lr": args.lr})
    pretrain.train(method, run)


if __name__ == "__main__":
    cli.run_main(main)
