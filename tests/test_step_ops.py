"""What one pretraining step costs a GPU beyond its arithmetic, for every method of common/methods.py:
the aten operations it dispatches (each one a kernel launch on CUDA), counted on the CPU with a
TorchDispatchMode over the method's own step (its build(args, run) on common.pretrain.in_memory's run:
28 px, ResNet-18, its smoke flags), and, on CUDA, no host sync inside a step
(torch.cuda.set_sync_debug_mode("error") turns any into an error).

The bounds hold for any method, so a new one is covered without a number of its own:
- the count does not depend on the batch size (the same at 16 and 32 images): no Python loop over the
  batch's images, in the views, the loss or a queue;
- the optimiser's step is a handful of foreach kernels whatever the number of parameters (Adam, AdamW and
  SGD: 10 at most per parameter group; a per-parameter loop is ~3 (SGD) to ~10 (Adam) per parameter tensor, ~180 to ~600 for a
  ResNet-18). Reads of Adam's step counters (CPU scalars, no sync; fused Adam on CUDA has none) are not
  kernels and are not counted. LARS (common.optim.LARS) computes its layer-wise trust ratio parameter by
  parameter: 7 ops per parameter tensor at most;
- a momentum encoder's update (common.ema.update) is 2 foreach kernels, whatever its size."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import ema, methods, pretrain

METHODS = methods.all_methods()
NOT_KERNELS = {"aten._local_scalar_dense.default", "profiler._record_function_enter_new.default",
               "profiler._record_function_exit._RecordFunction"}
OPTIMIZER_KERNELS = 16                 # Adam's foreach step: 10, per parameter group
PER_PARAMETER = {"lars": 7}            # an optimiser that works parameter by parameter: ops per parameter tensor
EMA_KERNELS = 2                        # per ema.update: a foreach lerp of the weights, a foreach copy of the buffers


class CountOps(TorchDispatchMode):
    """The ops dispatched, by part of the step ("optimizer", "ema", or "step" for the rest)."""

    def __init__(self):
        super().__init__()
        self.part = "step"
        self.counts = {"step": 0, "optimizer": 0, "ema": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in NOT_KERNELS:
            self.counts[self.part] += 1
        return func(*args, **(kwargs or {}))

    def counting(self, part, fn):
        def counted(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return fn(*args, **kwargs)
            finally:
                self.part = outer
        return counted


def step_of(method, batch_size, device):
    """(step(i) -> loss, the method, its args) of `method` at `batch_size` on 1-channel 28 px images."""
    script = importlib.import_module(method.script.removesuffix(".py"))
    args = script.get_args_parser().parse_args([*method.smoke_flags, "--batch-size", str(batch_size),
                                                "--in-chans", "1", "--epochs", "1"])
    images = torch.randint(0, 256, (3 * batch_size, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    built = script.build(args, pretrain.in_memory(vars(args), images, device))
    if built.start_epoch:
        built.start_epoch(0)
    return lambda i: built.step(images[i * batch_size:(i + 1) * batch_size], i)[0], built, args


def count(method, batch_size):
    """(ops by part of step 1, the number of EMA updates in it, the optimiser's parameter tensors, its name)."""
    step, built, args = step_of(method, batch_size, "cpu")
    step(0)  # the first step creates the optimiser's state
    counter, updates = CountOps(), []
    counted_update = counter.counting("ema", ema.update)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(built.optimizer, "step", counter.counting("optimizer", built.optimizer.step))
        monkeypatch.setattr(ema, "update", lambda *a, **k: (updates.append(1), counted_update(*a, **k))[1])
        with counter:
            loss = step(1)
    assert torch.isfinite(loss)
    n_params = sum(len(g["params"]) for g in built.optimizer.param_groups)
    return counter.counts, len(updates), n_params, args.optimizer, len(built.optimizer.param_groups)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_a_step_dispatches_a_bounded_number_of_ops(method):
    small, ema_calls, n_params, optimizer, n_groups = count(method, 16)
    large, *_ = count(method, 32)
    assert small == large, f"{method.name}: the ops depend on the batch size: {small} at 16, {large} at 32"
    assert small["step"] > 2 * n_params, small                    # the networks' forward and backward are counted
    # a foreach step per parameter group (e.g. weight decay on the weights only: 2 groups)
    bound = PER_PARAMETER.get(optimizer, 0) * n_params or OPTIMIZER_KERNELS * n_groups
    assert small["optimizer"] <= bound, (f"{method.name}: --optimizer {optimizer} dispatches {small['optimizer']} "
                                         f"ops for {n_params} parameter tensors; expected at most {bound}")
    assert small["ema"] <= EMA_KERNELS * ema_calls, f"{method.name}: {ema_calls} EMA updates, {small['ema']} ops"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_a_cuda_step_never_waits_for_the_device(method):
    step, _, _ = step_of(method, 16, "cuda")
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
