"""Learning-rate schedules, the LARS optimiser and the LR range test."""
import copy
import math

import torch

from common import flags
from common.errors import UserError


def cosine(step, total_steps, start, end):
    """Cosine interpolation from `start` at step 0 to `end` at `total_steps` (Loshchilov & Hutter;
    BYOL's EMA schedule, Grill et al. 2020 §3.2, uses the same curve from tau_base to 1)."""
    t = min(step, total_steps) / max(total_steps, 1)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def _cos_interp(t, start, end):
    """Cosine interpolation from `start` (t = 0) to `end` (t = 1)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def one_cycle(step, total_steps, max_lr, pct_start=0.25, div=25.0, div_final=1e5):
    """The 1cycle policy (Smith 2018) as fastai's fit_one_cycle runs it, paper 003's schedule
    (§3.4, §3.7, App. A.1): cosine warm-up from max_lr / div to max_lr over the first pct_start of
    training, then cosine annealing down to max_lr / div_final (fastai's defaults)."""
    peak = pct_start * total_steps
    if step < peak:
        return _cos_interp(step / peak, max_lr / div, max_lr)
    return _cos_interp((step - peak) / max(total_steps - peak, 1), max_lr, max_lr / div_final)


def one_cycle_momentum(step, total_steps, pct_start=0.25, moms=(0.95, 0.85, 0.95)):
    """1cycle's momentum, the mirror image of its lr: down from moms[0] to moms[1] while the lr
    rises, back up to moms[2] while it falls (fastai's defaults; paper 003 App. A.1)."""
    peak = pct_start * total_steps
    if step < peak:
        return _cos_interp(step / peak, moms[0], moms[1])
    return _cos_interp((step - peak) / max(total_steps - peak, 1), moms[1], moms[2])


LR_SCHEDULES = flags.LR_SCHEDULES


def learning_rate(schedule, step, total_steps, base_lr, warmup_steps=0, final_fraction=0.0):
    """The lr at `step` of `total_steps`: constant; cosine decay to `final_fraction` x base_lr (0: to 0;
    VICReg ends at 0.001) after a linear warm-up of `warmup_steps` (paper 002 used cosine annealing);
    1cycle peaking at base_lr (paper 003); or step: x0.1 at 50% and 75% of training (MedMNIST v2:
    epochs 50 and 75 of 100); or linear decay to 0 (the Hugging Face Trainer's default)."""
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - step / total_steps)
    if schedule == "step":
        return base_lr * 0.1 ** ((step >= total_steps // 2) + (step >= total_steps * 3 // 4))
    if schedule == "1cycle":
        return one_cycle(step, total_steps, base_lr)
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, base_lr, base_lr * final_fraction)


def schedule_step(optimizer, schedule, step, total_steps, base_lr, warmup_steps=0, final_fraction=0.0):
    """Set every parameter group's lr for this step (times the group's "lr_scale", if it has one:
    LARS' biases and BatchNorm parameters); 1cycle also cycles the momentum inversely (Adam's beta1,
    SGD's / LARS' momentum), as fastai does. Returns the lr."""
    lr = learning_rate(schedule, step, total_steps, base_lr, warmup_steps, final_fraction)
    momentum = one_cycle_momentum(step, total_steps) if schedule == "1cycle" else None
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if momentum is not None and "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif momentum is not None and "momentum" in group:
            group["momentum"] = momentum
    return lr


def layer_decay_groups(named_params, layer_of, n_layers, lr, decay=1.0, weight_decay=0.0):
    """Parameter groups of layer-wise learning-rate decay (LLRD: BEiT, Bao et al. 2022 §3 and App. B;
    MAE fine-tuning, He et al. 2022 A.1): a trainable parameter of layer layer_of(name) = i, numbered from
    0 (the input's embedding) to n_layers (the head), trains at lr x decay^(n_layers - i), so the head
    at lr and the layers below it ever slower. Each group keeps its factor as "lr_scale" (schedule_step
    applies it at every step) and its starting "lr". One group per factor: decay 1 is a single group,
    the optimiser of the plain parameter list. Every group has `weight_decay`."""
    groups = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer_of({name!r}) = {layer}, outside 0 .. {n_layers}")
        scale = decay ** (n_layers - layer)
        group = groups.setdefault(scale, {"params": [], "lr": lr * scale, "lr_scale": scale,
                                          "weight_decay": weight_decay, "layers": set()})
        group["params"].append(p)
        group["layers"].add(layer)
    out = []
    for scale in sorted(groups, reverse=True):
        group = groups[scale]
        out.append({**group, "layers": sorted(group["layers"])})  # for the reader: which layers a group holds
    return out


# Zbontar et al. 2021 ("Implementation details") and facebookresearch/barlowtwins' main.py: lr 0.2
# for the weights and 0.0048 for the biases and BatchNorm parameters, both x batch / 256.
BARLOW_BIAS_LR_RATIO = 0.0048 / 0.2


def lars_param_groups(params, lr, bias_lr_ratio=1.0):
    """facebookresearch/barlowtwins' two parameter groups: the weights at lr, the biases and
    BatchNorm parameters (1-D) at lr x bias_lr_ratio. Each group keeps its ratio as "lr_scale",
    which schedule_step applies to every step's lr, as Barlow Twins scales both by one schedule."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim != 1], "lr": lr, "lr_scale": 1.0},
            {"params": [p for p in params if p.ndim == 1], "lr": lr * bias_lr_ratio, "lr_scale": bias_lr_ratio}]


def lars_bias_lr_ratio(optimizer, lr, lr_biases):
    """The lr of biases and BatchNorm parameters as a multiple of the weights' (pretrain_barlow.py's
    --optimizer, --lr, --lr-biases): under LARS lr_biases / lr, or Barlow Twins' 0.0048 / 0.2 when
    lr_biases is None; 1 for the other optimisers, which give every parameter one lr."""
    if lr_biases is None:
        return BARLOW_BIAS_LR_RATIO if optimizer == "lars" else 1.0
    if optimizer != "lars":
        raise UserError(f"--lr-biases is the lr of biases and BatchNorm parameters under LARS; add "
                        f"--optimizer lars or drop --lr-biases (--optimizer {optimizer} gives every parameter --lr)")
    if lr == "auto":
        raise UserError("--lr-biases needs a number for --lr: give --lr, or drop --lr-biases and the biases "
                        f"follow the lr the range test finds at {BARLOW_BIAS_LR_RATIO:g} x it")
    if not (lr > 0 and lr_biases > 0):
        raise UserError(f"--lr and --lr-biases must be positive, got {lr:g} and {lr_biases:g}")
    return lr_biases / lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), Barlow Twins'
    optimiser (Zbontar et al. 2021, "Implementation details": lr 0.2 for weights and 0.0048 for
    biases and BN, x batch / 256, weight decay 1.5e-6), step for step facebookresearch/barlowtwins'
    LARS. The update of each weight matrix or kernel is (grad + wd * w) scaled by
    eta * ||w|| / ||grad + wd * w||; 1-D parameters (biases, BN) get neither weight decay nor the
    scaling (their exclude_bias_and_norm); lars_param_groups gives them their own lr."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:                       # exclude_bias_and_norm: p.ndim == 1
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def adam(params, lr, weight_decay, device, decoupled=False):
    """Adam (or AdamW) as one fused kernel over every parameter, on the CPU as on CUDA: a ResNet-18's
    step takes 17 ms on one CPU thread against 150-160 ms for the per-parameter loop or foreach (torch
    2.14), which at the small batches of fine-tuning on few labels was a third of each step. Same
    update; the fused kernel rounds differently (parameters within ~1e-5 after a few steps)."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    if torch.device(device).type in ("cpu", "cuda"):
        return kind(params, lr=lr, weight_decay=weight_decay, fused=True)
    return kind(params, lr=lr, weight_decay=weight_decay, foreach=True)


OPTIMIZERS = flags.OPTIMIZERS


def make_optimizer(name, params, lr, weight_decay, device="cpu", bias_lr_ratio=1.0, momentum=0.9):
    """adam, adamw (decoupled weight decay), sgd (with `momentum`; MoCo's 0.9) or lars over `params`;
    lars in lars_param_groups, its biases and BatchNorm parameters at lr x bias_lr_ratio (the others
    take one lr for all)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if name != "lars" and bias_lr_ratio != 1.0:
        raise ValueError(f"a separate lr for biases is a LARS option, not {name}'s")
    if name in ("adam", "adamw"):
        return adam(params, lr, weight_decay, device, decoupled=name == "adamw")
    if name == "sgd":  # foreach: a handful of kernels per step, as adam's
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    return LARS(lars_param_groups(params, lr, bias_lr_ratio), lr=lr, weight_decay=weight_decay, momentum=momentum)


def lr_valley(lrs, losses):
    """The lr half-way along the longest descending stretch of the loss curve (the longest strictly
    decreasing subsequence; fastai's "valley" idea): past the flat start, short of the minimum
    where the loss is about to blow up; paper 003 App. A.1 picks the lr "somewhere in between a
    sharp valley and the minimum". Always one of `lrs`."""
    n = len(losses)
    length, first = [1] * n, list(range(n))   # longest decreasing run ending at i, and where it starts
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], first[i] = length[j] + 1, first[j]
    end = max(range(n), key=lambda i: length[i])
    return lrs[first[end] + (end - first[end]) // 2]


def lr_range_test(batch_loss, optimizer, modules, start_lr=1e-7, end_lr=10.0, steps=100,
                  smoothing=0.98, diverge=4.0):
    """Leslie Smith's LR range test (fastai's lr_find; paper 003 §3.4, App. A.1): one optimiser step
    per lr of an exponential sweep from start_lr to end_lr, recording the loss (an exponential
    moving average, bias-corrected), stopping once it exceeds `diverge` x its minimum or is not
    finite. `batch_loss()` returns a fresh batch's loss; `optimizer` is a throwaway one over the
    parameters to train; the state of `modules` is restored afterwards, so the test leaves no
    trace. Returns (lrs, losses, the lr_valley pick)."""
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    lrs, losses = [], []
    average, best = 0.0, math.inf
    try:
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss = batch_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        for m, state in zip(modules, saved):
            m.load_state_dict(state)
        optimizer.zero_grad(set_to_none=True)
    if len(lrs) < 3:
        raise UserError(f"the LR range test diverged within {len(lrs)} steps of {start_lr:g}; "
                        f"start it lower (--lr-range START END STEPS) or give --lr")
    return lrs, losses, lr_valley(lrs, losses)
