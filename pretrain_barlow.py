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
import time

import torch
from tqdm import tqdm

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
    cli.add_common_flags(parser, data_help="dataset flag(s) whose train images are the unlabeled corpus; "
                           "several joined by commas (paper 002: chest X-rays, e.g. chestmnist)")
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
    g.add_argument("--aug", default=augment.PAPER002_MENU,
                   help=f"views: a menu of {'+'.join(augment.MENU)} joined by '+', applied in that order with "
                        f"paper 002's values (default: its final set), or a preset: paper002 (the same), "
                        f"paper003 (Barlow Twins' asymmetric pair with a 0.7-1 crop and rotation), "
                        f"{', '.join(sorted(augment.PRESETS))}")
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
                        "ran it); lars (Zbontar et al.: lr 0.2 x batch/256, weight decay 1.5e-6)")
    g.add_argument("--epochs", type=int, default=300,
                   help="epochs (paper 002: 300 on ~21k COVID X-rays; paper 003: 100 for the whole encoder)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch size, split evenly over torchrun's processes (papers 002 and 003: 128)")
    g.add_argument("--lr", type=cli.lr_or_auto, default=2e-3,
                   help="peak learning rate (paper 002's scan: 2e-3), or auto: an LR range test picks it "
                        "(paper 003), writing lr_range.json and lr_range.png")
    g.add_argument("--lr-range", type=float, nargs=3, default=[1e-7, 10.0, 100], metavar=("START", "END", "STEPS"),
                   help="sweep of --lr auto: lr from START to END over STEPS steps (fastai's lr_find: 1e-7 10 100)")
    g.add_argument("--lr-schedule", default="cosine", choices=list(optim.LR_SCHEDULES),
                   help="cosine annealing (paper 002), 1cycle (paper 003), or constant; over the epochs after "
                        "the frozen ones")
    g.add_argument("--warmup-epochs", type=int, default=0,
                   help="linear warm-up epochs for --lr-schedule cosine (Zbontar et al.: 10)")
    g.add_argument("--weight-decay", type=float, default=1e-5,
                   help="weight decay (paper 002's code: 1e-5; Zbontar et al. with LARS: 1.5e-6)")

    # * Monitoring and speed
    g = parser.add_argument_group("monitoring and speed")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N epochs, log the kNN AUC on the validation split of the first --data flag "
                        "(its train labels are the kNN memory; 0 = never)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    cli.add_resume_and_ddp_flags(parser)
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


def build_optimizer(name, params, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optim.LARS(params, lr=lr, weight_decay=weight_decay)


def set_phase(args, encoder, epoch):
    """Which part of the encoder trains in this epoch (paper 003 §3.7): none during the first
    --freeze-encoder-epochs, then --trainable. Returns the encoder's trainable parameter count."""
    return models.set_trainable(encoder, "none" if epoch < args.freeze_encoder_epochs else args.trainable)


def train_mode(args, encoder, projector):
    encoder.train()
    projector.train()
    if args.frozen_bn == "eval":
        models.frozen_bn_eval(encoder)


def step_loss(args, online, projector, batch, views, aug_gen, device):
    """Barlow Twins loss (plus the sparsity penalty on `projector`) of one uint8 global batch: two
    augmented views, `online` (encoder + projector, in DDP under torchrun) on this rank's rows of each
    (bf16 autocast on CUDA), the loss over the whole batch in float32, the same on every rank."""
    # every rank augments the whole batch and keeps its own rows: an image's views do not depend on
    # the number of processes, and aug_gen stays in step on every rank
    x1, x2 = (data.to_input(dist.my_rows(v), args.in_chans).contiguous(memory_format=torch.channels_last)
              for v in augment.two_views(batch, views, aug_gen))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z1, z2 = online(x1), online(x2)
    # the loss standardises along the batch: gather the global batch's embeddings (gradients reach
    # every rank's own rows; DDP's mean over ranks then gives the one-process gradient)
    loss = barlow_twins_loss(dist.all_rows(z1), dist.all_rows(z2), args.lambd)
    if args.sparsity:
        loss = loss + args.sparsity * sparsity_penalty(projector[-1].weight, args.sparsity_norm)
    return loss


def train_one_epoch(args, nets, optimizer, images, index, aug_gen, epoch, step, steps_per_epoch, device,
                    resume=None, save=None):
    """One epoch, from its start or from `resume` (a checkpoint's position inside it); `save(**position)`
    checkpoints the run every --save-every steps. Returns the step count and the epoch's figures."""
    encoder, projector, forward_encoder = nets
    frozen_epochs = args.freeze_encoder_epochs
    n_trainable = set_phase(args, encoder, epoch) + sum(p.numel() for p in projector.parameters())
    train_mode(args, encoder, projector)
    # built after set_phase: DDP syncs the gradients of the parameters trainable when it is built
    online = dist.distributed(torch.nn.Sequential(forward_encoder, projector), device)
    order, epoch_start, first, losses = pretrain.start_epoch(len(index), aug_gen, resume)
    perm = index[order]
    views = augment.views(args.aug, args.crop_scale)
    start = time.time()
    bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not dist.is_main())
    for i in bar:
        if epoch < frozen_epochs:  # projector alone, at a fixed lr (paper 003 §3.7)
            lr = optim.schedule_step(optimizer, "constant", 0, 1, args.freeze_lr)
        else:                      # the schedule spans the epochs after the frozen ones
            lr = optim.schedule_step(optimizer, args.lr_schedule, step - frozen_epochs * steps_per_epoch,
                                     (args.epochs - frozen_epochs) * steps_per_epoch, args.lr,
                                     args.warmup_epochs * steps_per_epoch)
        batch = images[perm[i * args.batch_size:(i + 1) * args.batch_size]]
        loss = step_loss(args, online, projector, batch, views, aug_gen, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        losses.append(loss.detach())  # the global batch's loss, the same on every rank
        step += 1
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if save and args.save_every and step % args.save_every == 0 and i + 1 < steps_per_epoch:
            save(epoch=epoch, step=step, step_in_epoch=i + 1, epoch_start=epoch_start, losses=losses)
    loss = pretrain.mean_finite_loss(losses, step, epoch, args.out)
    seconds = time.time() - start
    return step, {"loss": loss, "lr": lr, "frozen_encoder": epoch < frozen_epochs,
                  "trainable_params": n_trainable,
                  "images_per_sec": round((steps_per_epoch - first) * args.batch_size / seconds, 1)}


def find_lr(args, encoder, projector, images, index, device):
    """--lr auto: an LR range test on the part trained after the frozen epochs, from the initial
    weights (restored afterwards), with its own seeded generator so that the run's own random
    draws are those of a run given the found lr. Every rank takes part, as in training; rank 0
    writes lr_range.json and lr_range.png."""
    set_phase(args, encoder, args.freeze_encoder_epochs)
    train_mode(args, encoder, projector)
    online = dist.distributed(torch.nn.Sequential(encoder, projector), device)
    params = [p for p in [*encoder.parameters(), *projector.parameters()] if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, params, args.lr_range[0], args.weight_decay)
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    views = augment.views(args.aug, args.crop_scale)

    def batch_loss():
        pick = torch.randint(len(index), (args.batch_size,), generator=gen, device=index.device)
        return step_loss(args, online, projector, images[index[pick]], views, gen, device)
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
    device = dist.init_distributed(cli.pick_device(args.device))  # under torchrun: join its processes
    args.out = args.out or dist.on_main(cli.default_out, "pretrain_barlow", args.data)
    if args.freeze_encoder_epochs < 0 or args.freeze_encoder_epochs >= args.epochs:
        raise UserError(f"--freeze-encoder-epochs must be in [0, --epochs), got {args.freeze_encoder_epochs} "
                        f"with --epochs {args.epochs}")
    if args.init == "barlowtwins" and args.arch != "resnet50":
        raise UserError("--init barlowtwins is facebookresearch's ImageNet ResNet-50; add --arch resnet50")
    try:
        augment.views(args.aug, args.crop_scale)
    except ValueError as e:
        raise UserError(f"--aug: {e}")
    models.projector_sizes(args.projector)

    # ---- data: the train split(s), whole, as uint8 on the device; an index list to sample from
    images = data.load_pretrain_images(args.data, args.size, args.data_root, device, args.in_chans)
    if args.oversample:
        if "," in args.data:
            raise UserError("--oversample takes one --data flag (class numbers differ between datasets)")
        labels = data.load_split(args.data, "train", args.size, args.data_root, device, args.in_chans).labels
        index = oversample_index(labels, args.oversample)
    else:
        index = torch.arange(len(images), device=device)
    steps_per_epoch = pretrain.steps_per_epoch(len(index), args.batch_size, args.max_steps)
    monitor_splits = data.monitor_splits(args.data, args.size, args.data_root, device, args.in_chans) \
        if dist.is_main() and args.eval_every else None
    state = rundir.open_run(args)  # the checkpoint of an unfinished run in --out, or None

    # ---- model: encoder + projector (a new projector also when the encoder is pretrained, §3.7)
    cli.seed_everything(args.seed)
    aug_gen = torch.Generator(device).manual_seed(args.seed)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans)
    projector = models.projector(models.FEATURE_DIM[args.arch], args.projector)
    modules = {"encoder": encoder, "projector": projector}
    for m in modules.values():
        m.to(device, memory_format=torch.channels_last)
        if args.sync_bn:
            dist.sync_batchnorm(m)
    forward_encoder = torch.compile(encoder) if args.compile else encoder

    # ---- learning rate: given, found by a range test now, or the one a resumed run found
    if args.lr == "auto":
        args.lr = state["lr"] if state is not None else find_lr(args, encoder, projector, images, index, device)
    if args.freeze_lr is None:
        args.freeze_lr = args.lr

    # ---- optimiser: one over every parameter; frozen ones have no gradient and are skipped
    optimizer = build_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters()],
                                args.lr, args.weight_decay)

    # ---- resume: weights, optimiser, RNG states and the position, mid-epoch included
    objects = {**modules, "optimizer": optimizer}
    position = rundir.restore_run(state, objects, aug_gen)
    if state:
        print(f"resuming {args.out} at epoch {position['epoch']}, step {position['step_in_epoch']} of it")
    print(f"{len(index)} images per epoch, {steps_per_epoch} steps/epoch, encoder trainable: "
          f"{args.trainable} after {args.freeze_encoder_epochs} frozen epoch(s), lr {args.lr:.3g}"
          + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))

    # ---- loop: one JSON line per epoch; the checkpoint is overwritten (atomically) at every epoch's
    # end and every --save-every steps
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    save = functools.partial(pretrain.save_run, checkpoint_path, objects, aug_gen, lr=args.lr,
                             meta={"format": "medssl", "method": "barlow", "arch": args.arch, "stem": args.stem,
                                   "in_chans": args.in_chans, "args": vars(args)})
    step = position["step"]
    for epoch in range(position["epoch"], args.epochs):
        step, stats = train_one_epoch(args, (encoder, projector, forward_encoder), optimizer, images, index,
                                      aug_gen, epoch, step, steps_per_epoch, device,
                                      resume=position if epoch == position["epoch"] else None, save=save)
        stats = {"epoch": epoch, **stats}
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and dist.is_main():
            stats["knn_val_auc"] = round(models.knn_val_auc(encoder, *monitor_splits, args.in_chans), 4)
        if dist.is_main():
            rundir.append_jsonl(os.path.join(args.out, "log.jsonl"), stats)
        save(epoch=epoch + 1, step=step)
        print(stats)
    print(f"done: {checkpoint_path}")


if __name__ == "__main__":
    cli.run_main(main)
