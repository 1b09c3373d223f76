"""The pretraining loop every pretraining script runs."""
import os

import torch

from common import dist, rundir
from common.cli import UserError


def steps_per_epoch(n_images, batch_size, max_steps=None):
    """Full batches per epoch (the last partial one is dropped: BN needs full batches), capped by
    --max-steps; refuses a batch larger than the training set."""
    if batch_size > n_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_images} training images; "
                        f"use --batch-size {n_images} or less")
    if batch_size % dist.world_size():
        raise UserError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                        f"{dist.world_size()} torchrun processes")
    steps = n_images // batch_size
    return min(steps, max_steps) if max_steps else steps


def mean_finite_loss(losses, step, epoch, out):
    """Mean of an epoch's per-step losses (tensors, kept on the device so the loop never syncs);
    a non-finite one stops the run naming its step, before the epoch's checkpoint is written."""
    losses = torch.stack(losses)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = step - len(losses) + int(bad[0])
        raise UserError(f"loss became {losses[bad[0]].item()} at step {first} (epoch {epoch}); the last good "
                        f"checkpoint in {out} is kept; lower --lr or check the data")
    return losses.mean().item()


def save_run(path, objects, aug_generator, **state):
    """Check that every rank holds the same weights (ranks_agree), then write rundir.run_state(objects,
    aug_generator, **state) to `path` atomically, from rank 0 alone. Every rank calls it. A non-finite
    loss among the epoch's so far stops the run instead: a checkpoint is always a good one."""
    if state.get("losses"):
        mean_finite_loss(state["losses"], state["step"], state["epoch"], os.path.dirname(path))
    digests = dist.ranks_agree({k: v for k, v in objects.items() if isinstance(v, torch.nn.Module)})
    if dist.is_main():
        rundir.save_checkpoint(rundir.run_state(objects, aug_generator, **state, rank_digests=digests), path)


def start_epoch(n, generator, resume=None):
    """An epoch's start: its order of the n items, a permutation drawn from `generator`, the state it
    was drawn from (a mid-epoch checkpoint keeps it), its first step and the losses so far. Resuming
    mid-epoch (`resume`: restore_run's position, step_in_epoch > 0), the same permutation is drawn again
    from the saved state, on a copy so that `generator` stays where the checkpoint left it, and the
    steps done are skipped."""
    if resume and resume["step_in_epoch"]:
        saved = torch.Generator(generator.device).set_state(resume["epoch_start"])
        order = torch.randperm(n, generator=saved, device=generator.device)
        return order, resume["epoch_start"], resume["step_in_epoch"], list(resume["losses"].to(generator.device))
    epoch_start = generator.get_state()
    return torch.randperm(n, generator=generator, device=generator.device), epoch_start, 0, []
