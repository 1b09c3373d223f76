"""common/optim.py: schedules, the LR range test and LARS."""
import numpy as np
import pytest
import torch

from common import optim


def test_one_cycle_shape():
    total, peak_lr = 1000, 1e-2
    lrs = [optim.one_cycle(s, total, peak_lr) for s in range(total + 1)]
    top = int(np.argmax(lrs))
    assert top == 250 and lrs[top] == pytest.approx(peak_lr)              # pct_start 0.25
    assert lrs[0] == pytest.approx(peak_lr / 25) and lrs[-1] == pytest.approx(peak_lr / 1e5)
    assert all(a <= b for a, b in zip(lrs[:top], lrs[1:top + 1]))          # rises, then
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))           # falls
    moms = [optim.one_cycle_momentum(s, total) for s in range(total + 1)]
    assert int(np.argmin(moms)) == top and moms[0] == pytest.approx(0.95) and moms[-1] == pytest.approx(0.95)
    assert min(moms) == pytest.approx(0.85)


def test_cosine_schedule_with_warmup_and_constant():
    total, warmup, base = 100, 10, 2e-3
    lrs = [optim.learning_rate("cosine", s, total, base, warmup) for s in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(base) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[warmup + 45] == pytest.approx(base / 2)                      # half-way through the decay
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert optim.learning_rate("constant", 57, total, base) == base
    assert optim.learning_rate("1cycle", 25, total, base) == pytest.approx(base)


def test_schedule_step_sets_lr_and_one_cycle_momentum():
    w = torch.nn.Parameter(torch.zeros(2))
    adam, sgd = torch.optim.Adam([w], lr=1.0), torch.optim.SGD([w], lr=1.0, momentum=0.9)
    for opt in (adam, sgd):
        lr = optim.schedule_step(opt, "1cycle", 25, 100, 0.1)
        assert lr == pytest.approx(0.1) and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.85) and sgd.param_groups[0]["momentum"] == pytest.approx(0.85)


def _toy_regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = torch.nn.Linear(8, 1)
    pick = torch.Generator().manual_seed(seed + 1)

    def batch_loss():
        idx = torch.randint(256, (32,), generator=pick)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])
    return model, batch_loss


def test_lr_range_test_returns_an_lr_inside_its_sweep_and_restores_the_model():
    torch.manual_seed(0)
    model, batch_loss = _toy_regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    lrs, losses, lr = optim.lr_range_test(batch_loss, optimizer, [model], 1e-6, 10.0, 60)
    assert 1e-6 <= lr <= 10.0 and lr in lrs and len(lrs) == len(losses) >= 3
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6)
    assert 1e-3 < lr < 2.0                                   # SGD on this problem diverges above lr ~ 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_valley_sits_between_the_descent_and_the_minimum():
    lrs = list(np.logspace(-7, 1, 81))
    log_lr = np.log10(lrs)
    # flat until 1e-5, falls to a minimum at 1e-2, then blows up
    losses = list(np.where(log_lr < -5, 2.0, 2.0 - 0.5 * (log_lr + 5)) + np.where(log_lr > -2, 10 * (log_lr + 2) ** 2, 0))
    lr = optim.lr_valley(lrs, losses)
    assert 1e-5 < lr < 1e-2 and lr in lrs


def test_lars_scales_weight_updates_by_the_trust_ratio():
    layer = torch.nn.Linear(4, 3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = optim.LARS(layer.parameters(), lr=0.5, weight_decay=0.0, momentum=0.9, eta=0.001)
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    optimizer.step()
    # first step: the momentum buffer is the (scaled) gradient itself
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.5 * 0.001 * w0.norm() / gw.norm() * gw)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.5 * gb)     # 1-D: no scaling, no decay
