"""Momentum (EMA) encoders: a target network that follows the trained one as an exponential moving
average of its weights, and the schedule of its momentum. BYOL's target (Grill et al. 2020 Eq. 1), MoCo's
key encoder (He et al. 2020 Eq. 2) and DINO's teacher (Caron et al. 2021 §3.1) are all this."""
import copy

import torch

from common import optim


def frozen_copy(module):
    """A copy of `module` that the optimiser never trains: its weights move only by `update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, once per optimiser step, as a few foreach
    kernels rather than one per tensor. BatchNorm's running statistics are copied, not averaged: the
    target normalises with batch statistics in training, so they never enter the loss, and a copy keeps
    them those of the images the weights were trained on, should the target be evaluated."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - momentum)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(online.buffers()))


SCHEDULES = ("constant", "cosine")


def momentum(schedule, step, total_steps, base, final=1.0):
    """The momentum at optimiser `step` of `total_steps`: `base` throughout ("constant"; MoCo's 0.999,
    paper 001's 0.99), or a cosine from `base` at the start to `final` at the end ("cosine"; BYOL §3.2
    and DINO §3.1 go from 0.996 to 1)."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r}; expected one of {SCHEDULES}")
    return optim.cosine(step, total_steps, base, final)
