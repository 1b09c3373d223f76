"""DINO pretraining of an encoder on the train images of a dataset (labels unused).

DINO (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin 2021, "Emerging Properties in Self-Supervised
Vision Transformers"): self-distillation without labels. A student network (encoder + DINO head) is trained to
match, by cross-entropy, the softmax output of a teacher, a momentum copy of itself, across views: the teacher
sees the two global views of an image, the student these and several small local views (multi-crop). The
teacher's outputs are centred (a running mean subtracted) and sharpened (a low temperature), which together
keep them from collapsing.

    python pretrain_dino.py --config configs/cpu_dino.yaml --out runs/dino-cpu
    torchrun --nproc_per_node=8 pretrain_dino.py --config configs/dino.yaml
"""
import argparse
import math

from common import cli, flags
from common.errors import UserError


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "DINO"
CPU_CONFIG = "configs/cpu_dino.yaml"
SMOKE_FLAGS = ["--arch", "resnet18", "--head-hidden", "32", "--head-bottleneck", "16", "--out-dim", "64",
               "--head-bn", "--local-crops", "2", "--aug", "byol"]


def get_args_parser():
    parser = cli.pretrain_parser("DINO pretraining", __doc__)
    cli.set_defaults(parser, arch="vit_small_patch16_224", aug="byol", crop_scale=list(flags.GLOBAL_CROP_SCALE),
                     epochs=100, batch_size=1024, optimizer="adamw", lr=0.002, weight_decay=0.04,
                     lr_schedule="cosine", warmup_epochs=10, final_lr_fraction=5e-4, notes={
                         "arch": "Caron et al.: vit_small_patch16_224 (ViT-S/16) and ResNet-50",
                         "aug": "Caron et al. §3.1 and App.: BYOL's (byol), the global views differing in blur "
                                "(1.0, 0.1) and solarisation (0, 0.2); the local views are the first global view's "
                                "steps on a local crop, blur p 0.5",
                         "crop_scale": "of the two global views; Caron et al.: 0.4 1",
                         "epochs": "Caron et al.: 100 (Table 8) to 800",
                         "batch_size": "Caron et al.: 1024 over 16 GPUs",
                         "optimizer": "Caron et al.: adamw for ViTs (lars or sgd for ResNet-50)",
                         "lr": "Caron et al.: 0.0005 x batch / 256, i.e. 0.002 at 1024",
                         "weight_decay": "Caron et al.: 0.04 at the start of the cosine to --weight-decay-end 0.4",
                         "lr_schedule": "Caron et al.: cosine", "warmup_epochs": "Caron et al.: 10",
                         "final_lr_fraction": "Caron et al.: down to 1e-6, i.e. 5e-4 x 0.002"})
    cli.add_ema_flags(parser, momentum=0.996, schedule="cosine")
    cli.set_defaults(parser, notes={"ema": "the teacher's momentum, Caron et al. §3.1: 0.996 to 1",
                                    "ema_schedule": "Caron et al. §3.1: cosine"})

    # * DINO
    g = parser.add_argument_group("DINO")
    g.add_argument("--local-crops", type=int, default=6, metavar="N",
                   help="local views per image, seen by the student alone (Caron et al. Table 8's 100-epoch "
                        "ViT-S/16: 6; their code's default 8, their best 10; 0: two global views only)")
    g.add_argument("--local-size", type=int, default=None, metavar="PX",
                   help="side of the local views (default: 96/224 of --size, as Caron et al.'s 96 px at 224: 12 px "
                        "at 28, 28 px at 64; for a ViT a multiple of its patch side, 24 px at 64 with 8 px patches)")
    g.add_argument("--local-crop-scale", type=float, nargs=2, default=list(flags.LOCAL_CROP_SCALE),
                   metavar=("MIN", "MAX"), help="area range of the local crops (default and Caron et al.: 0.05 0.4)")
    g.add_argument("--out-dim", type=int, default=65536, metavar="K",
                   help="output width K of the DINO head, the teacher's softmax over K dimensions (default and "
                        "Caron et al.: 65536)")
    g.add_argument("--head-hidden", type=int, default=2048,
                   help="hidden width of the head's 3-layer MLP (default and Caron et al.: 2048)")
    g.add_argument("--head-bottleneck", type=int, default=256,
                   help="width of the head's l2-normalised bottleneck before its last layer (default and "
                        "Caron et al.: 256)")
    g.add_argument("--head-bn", action="store_true",
                   help="BatchNorm after the head's hidden layers (Caron et al.'s code: use_bn_in_head, default "
                        "off, as for their ViTs); a ResNet's average-pooled features share a large positive mean, "
                        "which BatchNorm takes out (default off)")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="the head's weight-normalised last layer keeps every output's weight norm at 1 (default and "
                        "Caron et al.'s code: on); --no-norm-last-layer trains the norms too (their ViT-S/16 at 800 "
                        "epochs: better, less stable)")
    g.add_argument("--freeze-last-layer", type=int, default=1, metavar="EPOCHS",
                   help="epochs at the start in which the head's last layer is not trained (default and Caron et "
                        "al.'s code: 1)")
    g.add_argument("--student-temp", type=float, default=0.1,
                   help="student softmax temperature (default and Caron et al. §3.1: 0.1)")
    g.add_argument("--teacher-temp", type=float, default=0.07,
                   help="teacher softmax temperature after the warm-up (Caron et al. §3.1 and App.: 0.04 to 0.07 "
                        "over 30 epochs; default 0.07)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04,
                   help="teacher temperature at the first epoch, linearly up to --teacher-temp (default and "
                        "Caron et al.: 0.04)")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=30,
                   help="epochs of the teacher-temperature warm-up (default and Caron et al.: 30)")
    g.add_argument("--center-momentum", type=float, default=0.9,
                   help="momentum of the centre, the running mean of the teacher's outputs (default and Caron et "
                        "al. Eq. 4: 0.9)")
    g.add_argument("--weight-decay-end", type=float, default=0.4,
                   help="weight decay at the end of a cosine from --weight-decay (default and Caron et al.: 0.4); "
                        "biases and normalisation weights do not decay (as Caron et al.)")
    g.add_argument("--clip-grad", type=float, default=3.0,
                   help="each parameter's gradient is scaled down to this norm at most (default and Caron et al.'s "
                        "code: 3.0; 0: no clipping)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
import torch.nn.functional as F

from common import augment, dist, ema, models, optim, pretrain


def teacher_temperature(epoch, warmup_temp, temp, warmup_epochs):
    """The teacher's temperature at `epoch`: linear from warmup_temp at epoch 0 to temp at epoch
    warmup_epochs - 1, then temp (Caron et al. §3.1 and App.)."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)


class DINOHead(torch.nn.Module):
    """DINO's head (Caron et al. §3.1 and App. "Projection head"): a 3-layer MLP (GELU; BatchNorm after its
    hidden layers with `batchnorm`, their code's use_bn_in_head) to a bottleneck, l2-normalised, then a
    weight-normalised linear layer without bias to out_dim (Salimans & Kingma 2016: each output's weight
    vector is magnitude x direction / |direction|). With norm_last_layer the magnitudes stay 1 (not
    trained). Linear weights start from a truncated normal of std 0.02."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=True, batchnorm=False):
        super().__init__()
        layers = []
        for width_in in (in_dim, hidden_dim):
            layers.append(torch.nn.Linear(width_in, hidden_dim, bias=not batchnorm))  # BatchNorm has the bias
            layers += [torch.nn.BatchNorm1d(hidden_dim)] if batchnorm else []
            layers.append(torch.nn.GELU())
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)
        # the last layer's directions start as a torch.nn.Linear's weights do
        self.last_direction = torch.nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        torch.nn.init.kaiming_uniform_(self.last_direction, a=math.sqrt(5))
        self.last_magnitude = torch.nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer(self):
        """The parameters of the last layer (kept from training in the first --freeze-last-layer epochs)."""
        return [self.last_direction, self.last_magnitude]

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_magnitude * F.normalize(self.last_direction, dim=1))


class MultiCrop(torch.nn.Module):
    """The student: the encoder on each resolution's views in one pass (the global views together, then the
    local views), the head once on all their features, as Caron et al.'s code does."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, global_views, local_views=None):
        features = self.encoder(global_views)
        if local_views is not None:
            features = torch.cat([features, self.encoder(local_views)])
        return self.head(features)


def dino_loss(teacher_out, student_out, center, teacher_temp, student_temp):
    """DINO's loss (Caron et al. Eq. 1-3): the cross-entropy between the teacher's centred, sharpened output
    softmax((t - center) / teacher_temp) and the student's log_softmax(s / student_temp), summed over the
    pairs of a teacher view and a different student view, averaged over the pairs and the images.
    teacher_out: (T, n, K), the T global views; student_out: (S, n, K), the same global views first,
    then the local ones; center: (K,). In float32."""
    t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    log_s = F.log_softmax(student_out.float() / student_temp, dim=-1)
    per_pair = -torch.einsum("tnk,snk->ts", t, log_s)       # (T, S): summed over the images
    per_pair = per_pair.fill_diagonal_(0)                   # a view is not compared with itself
    n_pairs = per_pair.numel() - min(per_pair.shape)
    return per_pair.sum() / (n_pairs * teacher_out.shape[1])


def forward_loss(student, teacher, global_views, local_views, center, teacher_temp, student_temp, precision):
    """DINO's loss of this rank's images, and the mean of the teacher's outputs (for the centre), from the
    global views (the 2 global views joined, view after view) and the local views (joined the same way, or
    None), in the run's `precision`. What --compile compiles."""
    n = len(global_views) // 2
    with precision.autocast(global_views.device.type):
        student_out = student(global_views, local_views)
        with torch.no_grad():
            teacher_out = teacher(global_views)
    teacher_out = teacher_out.float().view(2, n, -1)
    loss = dino_loss(teacher_out, student_out.float().view(-1, n, teacher_out.shape[-1]), center, teacher_temp,
                     student_temp)
    return loss, teacher_out.mean(dim=(0, 1))


@torch.no_grad()
def update_center(center, batch_center, momentum):
    """center <- momentum x center + (1 - momentum) x the global batch's mean teacher output (Caron et al.
    Eq. 4; every rank's mean, averaged over the ranks: each holds as many images). In place."""
    center.mul_(momentum).add_(dist.mean_over_ranks(batch_center), alpha=1 - momentum)


@torch.no_grad()
def clip_each(params, max_norm):
    """Scale each parameter's gradient down to norm max_norm at most (Caron et al.'s code clips parameter by
    parameter, not the global norm), in a few foreach ops and without reading the norms back to the host."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    scales = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


def views_input(views, run):
    """This rank's rows of each of `views` (uint8 global batches' views), joined view after view, as one input
    tensor in the run's memory layout; None for no views."""
    if not views:
        return None
    return torch.cat([pretrain.as_input(v, run) for v in views]).contiguous(memory_format=run.precision.memory_format)


def local_side(args, patch_size):
    """The local views' side: --local-size, or 96/224 of --size rounded to whole patches of a ViT."""
    if args.local_size is None:
        return augment.local_side(args.size, patch_size or 2)
    if patch_size and args.local_size % patch_size:
        raise UserError(f"--local-size {args.local_size} is not whole {patch_size} px patches of the ViT; use a "
                        f"multiple of {patch_size}, e.g. {augment.local_side(args.size, patch_size)}")
    return args.local_size


def check(args):
    """Refuse, before anything is written: flags that cannot make a local view, an inverted local crop range."""
    lo, hi = args.local_crop_scale
    if lo > hi:
        raise UserError(f"--local-crop-scale needs MIN <= MAX, got {lo:g} {hi:g}")
    if args.local_crops:
        try:
            augment.local_view(augment.views(args.aug, args.crop_scale)[0], 2, args.size, (lo, hi))
        except ValueError as e:
            raise UserError(f"--aug {args.aug}: {e}")
        local_side(args, models.encoder_settings(args.arch, args.size, args.patch_size, args.pool)["patch_size"])


def build(args, run):
    # ---- model: student = encoder + DINO head; teacher = their momentum copy (Caron et al. §3.1)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    head = DINOHead(models.feature_dim(encoder), args.head_hidden, args.head_bottleneck, args.out_dim,
                    args.norm_last_layer, args.head_bn)
    teacher_encoder, teacher_head = ema.frozen_copy(encoder), ema.frozen_copy(head)
    modules = {"encoder": encoder, "head": head, "teacher_encoder": teacher_encoder, "teacher_head": teacher_head}
    pretrain.place(modules, run)
    student = dist.distributed(MultiCrop(encoder, head), run.device)
    teacher = torch.nn.Sequential(teacher_encoder, teacher_head)

    # ---- multi-crop: the two global views of --aug at the images' side, --local-crops local views
    patch_size = encoder.patch_embed.patch_size[0] if models.is_vit(encoder) else None
    side = local_side(args, patch_size)
    try:
        local_steps = augment.local_view(run.views[0], side, args.size, args.local_crop_scale) \
            if args.local_crops else []
    except ValueError as e:
        raise UserError(f"--aug {args.aug}: {e}")

    # ---- the centre of the teacher's outputs (Caron et al. Eq. 4), saved and restored with the run; the
    # teacher's temperature lives in a tensor, so that --compile compiles one graph for all its values
    center = torch.zeros(args.out_dim, device=run.device)
    temperature = torch.zeros((), device=run.device)

    # ---- optimiser: biases and normalisation weights (1-D) without weight decay, as Caron et al.'s code (LARS
    # exempts them itself); the first group's weight decay set every step (a cosine, Caron et al. App.)
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    groups = params if args.optimizer == "lars" else [{"params": [p for p in params if p.ndim > 1]},
                                                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = optim.make_optimizer(args.optimizer, groups, args.lr, args.weight_decay, run.device)
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One DINO step on a uint8 global batch: lr, weight decay, momentum and teacher temperature for this
        step, the multi-crop views, the loss, backward, per-parameter clipping, the last layer kept still in
        the first epochs, an optimiser step, then the teacher's EMA and the centre's (both the same on every
        rank)."""
        epoch = i // run.steps_per_epoch
        lr = pretrain.set_lr(optimizer, run, i)
        weight_decay = optim.cosine(i, run.total_steps, args.weight_decay, args.weight_decay_end)
        optimizer.param_groups[0]["weight_decay"] = weight_decay  # the weights' group (LARS's too)
        m = ema.momentum(args.ema_schedule, i, run.total_steps, args.ema)
        tau = teacher_temperature(epoch, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs)
        temperature.fill_(tau)
        global_views, local_views = augment.multi_crop(batch, run.views, local_steps, args.local_crops, run.generator)
        loss, batch_center = loss_fn(student, teacher, views_input(global_views, run), views_input(local_views, run),
                                     center, temperature, args.student_temp, run.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            clip_each(params, args.clip_grad)
        if epoch < args.freeze_last_layer:  # Caron et al.'s code: no update of the last layer in the first epoch
            for p in head.last_layer():
                p.grad = None
        optimizer.step()
        ema.update(teacher_encoder, encoder, m)
        ema.update(teacher_head, head, m)
        update_center(center, batch_center, args.center_momentum)
        return dist.mean_over_ranks(loss.detach()), {"lr": lr, "weight_decay": weight_decay, "ema": m,
                                                     "teacher_temp": tau}

    summary = (f"2 global views of {args.size} px and {args.local_crops} local views of {side} px per image, "
               f"a head to {args.out_dim} outputs")
    return pretrain.Method("dino", modules, optimizer, step, state={"center": center}, summary=summary)


def main():
    pretrain.main("pretrain_dino", get_args_parser, build, check=check)


if __name__ == "__main__":
    cli.run_main(main)
