"""What one pretraining step costs a GPU beyond its arithmetic: the number of aten operations it
dispatches (each one a kernel launch on CUDA), counted on the CPU with a TorchDispatchMode over the
scripts' own train_step (built as benchmarks/bench_speed.py builds it), and, on CUDA, no host sync
inside a step (torch.cuda.set_sync_debug_mode("error") turns any into an error).

Budgets: the counts measured on torch 2.14 (28 px, ResNet-18, batch 16) plus about 5%: BYOL with byol+
views 1,510 (4 ResNet forwards, 2 backwards, foreach Adam, a foreach EMA), Barlow Twins 1,193, SimCLR
1,025. Of each, ~130 are reads of Adam's step counters, CPU scalars that cost no sync (fused Adam on CUDA
has none). A per-parameter optimiser or EMA loop adds ~500 ops and fails the budget."""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_speed  # noqa: E402

BUDGET = {"byol": 1590, "barlow": 1260, "simclr": 1080}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def step_of(workload, device):
    cfg = {"workload": workload, "batch": 16, "in_chans": 1, "arch": "resnet18", "stem": "imagenet",
           "byol_aug": "byol+"}
    variant = bench_speed.parse_variant(f"{device}+cl")
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, device=device)
    return bench_speed.build_step(cfg, variant, torch.device(device), images)


@pytest.mark.parametrize("workload", sorted(BUDGET))
def test_a_step_dispatches_no_more_aten_ops_than_its_budget(workload):
    step = step_of(workload, "cpu")
    step(0)  # the first step creates the optimiser's state
    counter = CountOps()
    with counter:
        loss = step(1)
    assert torch.isfinite(loss)
    assert 0.5 * BUDGET[workload] < counter.n <= BUDGET[workload], counter.n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("workload", sorted(BUDGET))
def test_a_cuda_step_never_waits_for_the_device(workload):
    step = step_of(workload, "cuda")
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
