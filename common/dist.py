"""torchrun / DistributedDataParallel helpers, and a CPU SyncBatchNorm."""
import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # collectives that autograd differentiates

from common import errors
from common.errors import UserError


# `torchrun --nproc_per_node=N script.py ...` starts N processes (ranks) with RANK, WORLD_SIZE and
# LOCAL_RANK set. All ranks draw the same permutation and augmentations from the same seed; each trains
# on its rows of every global batch; DDP averages the gradients; rank 0 alone writes files. A plain
# `python script.py` run has no process group, and every helper below then leaves things as they are.
def init_distributed(device):
    """Join torchrun's process group when torchrun started this process: gloo on the CPU, nccl on
    CUDA with one GPU per local rank. Returns the device to train on."""
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        local_rank, visible = os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count()
        if not local_rank.isdigit() or int(local_rank) >= visible:
            raise UserError(f"LOCAL_RANK {local_rank} but torch sees {visible} CUDA GPU(s); start torchrun with "
                            f"--nproc_per_node={visible} or fewer per machine, or check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", int(local_rank))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for all (errors still reach stderr)
    return device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def on_main(fn, *args):
    """fn(*args) run by rank 0 alone, its result sent to every rank (rank 0 owns the run directory); a
    UserError it raises is raised on every rank, so that all stop with that one line; any other
    exception is raised on rank 0 and the others stop in silence (errors.ReportedElsewhere) instead of
    waiting for a result that never comes. The other ranks also learn where the run directory and its
    checkpoint are (errors.progress), so that whichever rank reports an interrupt names what is kept."""
    if world_size() == 1:
        return fn(*args)
    message = [None, None]
    failure = None
    if is_main():
        try:
            message[0] = fn(*args)
        except UserError as e:
            message[0] = e
        except Exception as e:
            failure, message[0] = e, errors.ReportedElsewhere(f"rank 0 failed: {type(e).__name__}")
        message[1] = {k: getattr(errors.progress, k) for k in ("out", "checkpoint", "overwrite")}
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if not is_main():
        errors.progress.update(**message[1])
    if isinstance(message[0], (UserError, errors.ReportedElsewhere)):
        raise message[0]
    return message[0]


def my_rows(batch):
    """This rank's rows of a global batch: the whole batch in a single process."""
    n = len(batch) // world_size()
    return batch[rank() * n:(rank() + 1) * n]


def all_rows(x):
    """The global batch, gathered from every rank's rows of it (the inverse of my_rows); gradients flow
    back to each rank's own rows. For a loss over the whole batch, such as Barlow Twins'."""
    return funcol.all_gather_single(x, 0, dist.group.WORLD) if world_size() > 1 else x


def mean_over_ranks(x):
    """The mean of a tensor over the ranks (of the step's loss: rank 0 then logs the global batch's)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def distributed(module, device):
    """`module` in DistributedDataParallel under torchrun (gradients averaged over the ranks), as it is
    otherwise. DDP syncs the gradients of the parameters that require them when it is built."""
    if world_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def state_digest(state_dicts):
    """SHA-256 of the names and bytes of every tensor in some state dicts."""
    digest = hashlib.sha256()
    for state in state_dicts:
        for name, tensor in state.items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ranks_agree(modules):
    """Before rank 0 saves for every rank: give every rank rank 0's buffers (without --sync-bn a rank's
    BatchNorm running statistics follow its own rows; DDP copies rank 0's at each forward anyway), then
    check that all ranks hold the same modules. Returns the ranks' state digests, in rank order; None in
    a single process."""
    if world_size() == 1:
        return None
    for module in modules.values():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    digests = [None] * world_size()
    dist.all_gather_object(digests, state_digest([m.state_dict() for m in modules.values()]))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks' weights differ (state digests {digests}); rank 0 cannot save for all")
    return digests


def sync_batchnorm(module):
    """--sync-bn: every BatchNorm layer of `module` normalises with the statistics of the global batch
    (all ranks' rows), as a single process does. On CUDA torch.nn.SyncBatchNorm does it; torch 2.14's
    refuses CPU tensors, so on the CPU each layer becomes a CPUSyncBatchNorm, keeping its parameters and
    buffers. Returns the module (changed in place)."""
    if any(p.is_cuda for p in module.parameters()):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.__class__ = CPUSyncBatchNorm
    return module


def _sum_over_ranks(x):
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d that, in training mode under torchrun, normalises with the mean and biased
    variance of the global batch: per-channel sums all-reduced over the ranks, which autograd
    differentiates (as SyncBatchNorm's gradient does). Otherwise it is plain BatchNorm."""

    def _check_input_dim(self, x):  # stands in for BatchNorm1d and BatchNorm2d alike
        pass

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        # statistics in float32 whatever the input (bf16 under autocast), as BatchNorm's own kernels keep them;
        # the output in the input's dtype, as theirs
        dtype, x = x.dtype, x.float()
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * world_size()
        mean = _sum_over_ranks(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _sum_over_ranks(centred.pow(2).sum(dims)) / n  # a second pass: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm keeps it
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return (y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y).to(dtype)
