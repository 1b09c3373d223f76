"""common/optim.py: schedules, the LR range test and LARS."""
import os

import numpy as np
import pytest
import torch

from common import optim
from conftest import REPO


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


# ---------------------------------------------------------------- LARS as facebookresearch/barlowtwins runs it

def _net(seed=0):
    """Weights, biases and BatchNorm parameters, as a Barlow Twins projector has them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 4))


def test_lars_groups_are_facebookresearch_weights_and_biases_with_their_lrs():
    net, batch = _net(), 512
    lr = 0.2 * batch / 256
    optimizer = optim.make_optimizer("lars", net.parameters(), lr, 1.5e-6, bias_lr_ratio=optim.BARLOW_BIAS_LR_RATIO)
    weights, biases = optimizer.param_groups
    assert {id(p) for p in weights["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in biases["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert weights["lr"] == pytest.approx(0.2 * batch / 256) and biases["lr"] == pytest.approx(0.0048 * batch / 256)
    # every schedule scales both groups alike, as facebookresearch's adjust_learning_rate does
    for schedule in ("cosine", "1cycle", "step"):
        now = optim.schedule_step(optimizer, schedule, 37, 100, lr, warmup_steps=10)
        assert weights["lr"] == pytest.approx(now) and biases["lr"] == pytest.approx(now * 0.0048 / 0.2)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    lrs, _, _ = optim.lr_range_test(lambda: net(x).pow(2).mean(), optimizer, [net], 1e-4, 1e-3, 3, diverge=1e9)
    assert weights["lr"] == pytest.approx(lrs[-1]) and biases["lr"] == pytest.approx(lrs[-1] * 0.0048 / 0.2)
    # one lr for all elsewhere: SimCLR's LARS (Chen et al.) and Adam
    assert {g["lr"] for g in optim.make_optimizer("lars", net.parameters(), 0.3, 1e-6).param_groups} == {0.3}
    with pytest.raises(ValueError, match="LARS option"):
        optim.make_optimizer("adam", net.parameters(), 1e-3, 0.0, bias_lr_ratio=0.5)


def test_pretrain_barlow_lr_biases_flag_defaults_to_facebookresearch_ratio():
    import pretrain_barlow
    from common import cli
    from common.errors import UserError
    parse = lambda *flags: cli.parse_args(pretrain_barlow.get_args_parser(), list(flags))
    ratio = lambda a: optim.lars_bias_lr_ratio(a.optimizer, a.lr, a.lr_biases)
    assert ratio(parse("--optimizer", "lars", "--lr", "0.4")) == pytest.approx(0.0048 / 0.2)
    assert ratio(parse("--optimizer", "lars", "--lr", "0.4", "--lr-biases", "0.01")) == pytest.approx(0.025)
    assert ratio(parse("--optimizer", "lars", "--lr", "auto")) == pytest.approx(0.024)
    for name in ("paper002_barlow", "paper003_further", "cpu_barlow", "cpu_further"):   # Adam / AdamW: one lr
        assert ratio(parse("--config", os.path.join(REPO, "configs", f"{name}.yaml"))) == 1.0
    with pytest.raises(UserError, match="--optimizer lars"):
        ratio(parse("--optimizer", "adam", "--lr-biases", "0.01"))
    with pytest.raises(UserError, match="needs a number for --lr"):
        ratio(parse("--optimizer", "lars", "--lr", "auto", "--lr-biases", "0.01"))


def _facebookresearch_lars_step(groups, state, weight_decay, momentum=0.9, eta=0.001):
    """facebookresearch/barlowtwins main.py's LARS.step, written out: exclude_bias_and_norm (ndim == 1)
    skips weight decay and the trust ratio; mu = momentum * mu + dp; p -= lr * mu."""
    with torch.no_grad():
        for lr, params in groups:
            for p in params:
                dp = p.grad
                if p.ndim != 1:
                    dp = dp + weight_decay * p
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
                    dp = dp * q
                mu = state[p] = momentum * state.get(p, torch.zeros_like(p)) + dp
                p -= lr * mu


def test_lars_steps_equal_facebookresearch_update_rule_by_hand():
    import copy
    ours, theirs = _net(1), _net(1)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    wd, batch, total = 1.5e-6, 256, 40
    optimizer = optim.make_optimizer("lars", ours.parameters(), 0.2, wd, bias_lr_ratio=optim.BARLOW_BIAS_LR_RATIO)
    state = {}
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    for step in (3, 4, 25):                               # momentum carries over; the lr changes
        lr = optim.schedule_step(optimizer, "cosine", step, total, 0.2 * batch / 256, warmup_steps=10)
        for net in (ours, theirs):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        optimizer.step()
        weights = [theirs[0].weight, theirs[3].weight]
        biases = [theirs[0].bias, theirs[1].weight, theirs[1].bias, theirs[3].bias]
        _facebookresearch_lars_step([(lr, weights), (lr * 0.0048 / 0.2, biases)], state, wd)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(ours[3].bias, _net(1)[3].bias) and not torch.equal(ours[1].bias, _net(1)[1].bias)


def test_layer_decay_groups_scale_each_layer_and_skip_frozen_parameters():
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    layers[1].bias.requires_grad_(False)
    groups = optim.layer_decay_groups(layers.named_parameters(), lambda name: int(name.split(".")[0]), 2, 0.1, 0.5,
                                      1e-4)
    assert [(g["lr"], g["lr_scale"], g["layers"]) for g in groups] == [(0.1, 1.0, [2]), (0.05, 0.5, [1]),
                                                                       (0.025, 0.25, [0])]
    assert [len(g["params"]) for g in groups] == [2, 1, 2] and all(g["weight_decay"] == 1e-4 for g in groups)
    one = optim.layer_decay_groups(layers.named_parameters(), lambda name: int(name.split(".")[0]), 2, 0.1, 1.0)
    assert len(one) == 1 and one[0]["params"] == [p for p in layers.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="outside 0 .. 2"):
        optim.layer_decay_groups(layers.named_parameters(), lambda name: 3, 2, 0.1, 0.5)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_is_one_fused_kernel_on_the_cpu_and_follows_torchs_reference_update(decoupled):
    """optim.adam (fused on the CPU) against torch's per-parameter Adam / AdamW: the same update, with
    groups at their own lr, an lr schedule and weight decay, to the fused kernel's rounding."""
    def train(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 3))
        groups = [{"params": model[0].parameters(), "lr": 3e-4}, {"params": [*model[1].parameters(),
                                                                         *model[3].parameters()]}]
        opt = make(groups)
        gen = torch.Generator().manual_seed(1)
        for step in range(20):
            opt.param_groups[1]["lr"] = 1e-3 * (1 - step / 20)
            x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt, torch.cat([p.detach().flatten() for p in model.parameters()])
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    ours, mine = train(lambda g: optim.adam(g, 1e-3, 0.05, "cpu", decoupled=decoupled))
    ref, theirs = train(lambda g: kind(g, lr=1e-3, weight_decay=0.05, foreach=False))
    assert ours.param_groups[0]["fused"] and isinstance(ours, kind)
    start = train(lambda g: kind(g, lr=0.0))[1]
    assert (theirs - start).abs().max() > 1e-3                     # the parameters did move
    torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-5)  # ... by the same update (without the weight decay: 2e-3)
