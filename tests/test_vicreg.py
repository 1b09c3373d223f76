"""pretrain_vicreg.py: its loss and gradient against lightly's VICRegLoss, each weight flag on its own term,
the step's loss on the network's own embeddings, LARS as Bardes et al. set it, the configs, and the CLI on
real data. Resume after SIGKILL and the 2-process run: the tests over every method (tests/test_resume.py,
test_ddp.py)."""
import inspect
import json

import numpy as np
import pytest
import torch

import pretrain_vicreg
from common import cli, optim, pretrain
from common.errors import UserError
from conftest import REPO, run_cli


def embeddings(n, d, scale, seed=0):
    """Two correlated views' embeddings (n, d) whose dimensions have a standard deviation near `scale`."""
    g = torch.Generator().manual_seed(seed)
    z1 = scale * torch.randn(n, d, generator=g)
    z2 = z1 + 0.5 * scale * torch.randn(n, d, generator=g)
    return z1, z2


def lightly_vicreg():
    """lightly's VICRegLoss module; its parameters' names checked, as the comparisons pass them by name."""
    import lightly.loss.vicreg_loss as module  # requirements-test.txt: a missing lightly fails, never skips
    names = inspect.signature(module.VICRegLoss).parameters
    assert {"lambda_param", "mu_param", "nu_param", "eps"} <= set(names) and names["eps"].default == 1e-4
    return module


# (n, d, scale, hinge): std 0.1 keeps the variance hinge max(0, 1 - std) active in every dimension, std 3
# leaves it at 0; fewer rows than dimensions (a rank-deficient covariance) and a batch of 2 too
@pytest.mark.parametrize("n,d,scale,hinge", [(16, 8, 0.1, "active"), (16, 8, 3.0, "off"), (8, 32, 0.5, None),
                                             (64, 128, 1.0, None), (2, 4, 0.3, None)])
def test_loss_and_gradient_equal_lightlys(n, d, scale, hinge):
    lightly = lightly_vicreg()
    z1, z2 = embeddings(n, d, scale)
    if hinge:
        assert (lightly.variance_loss(z1).item() > 0.5) == (hinge == "active")
        assert (lightly.variance_loss(z1).item() == 0) == (hinge == "off")
    ours_in = [z.clone().requires_grad_() for z in (z1, z2)]
    theirs_in = [z.clone().requires_grad_() for z in (z1, z2)]
    ours = pretrain_vicreg.vicreg_loss(*ours_in, 25, 25, 1)
    theirs = lightly.VICRegLoss(lambda_param=25, mu_param=25, nu_param=1)(*theirs_in)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    for mine, reference in zip(ours_in, theirs_in):
        assert reference.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-6 * reference.grad.abs().max().item())


@pytest.mark.parametrize("flag,term", [("--invariance-weight", "invariance"), ("--variance-weight", "variance"),
                                       ("--covariance-weight", "covariance")])
def test_each_weight_flag_scales_its_own_term(flag, term):
    """A flag at 3 with the other two at 0: 3 x lightly's term of that name (variance: the mean of the two
    views'; covariance: their sum), and the terms of the three differ, so no flag feeds another's term."""
    lightly = lightly_vicreg()
    z1, z2 = embeddings(16, 8, 0.3)
    expected = {"invariance": lightly.invariance_loss(z1, z2),
                "variance": (lightly.variance_loss(z1) + lightly.variance_loss(z2)) / 2,
                "covariance": lightly.covariance_loss(z1) + lightly.covariance_loss(z2)}
    assert len({round(v.item(), 4) for v in expected.values()}) == 3
    zeros = [f for name in ("invariance", "variance", "covariance") for f in (f"--{name}-weight", "0")]
    args = pretrain_vicreg.get_args_parser().parse_args([*zeros, flag, "3"])
    loss = pretrain_vicreg.vicreg_loss(z1, z2, args.invariance_weight, args.variance_weight, args.covariance_weight)
    torch.testing.assert_close(loss, 3 * expected[term], rtol=1e-5, atol=1e-6)


def test_loss_is_float32_under_autocast_and_zero_only_when_views_agree_and_are_spread_and_decorrelated():
    z1, z2 = embeddings(32, 6, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pretrain_vicreg.vicreg_loss(z1.bfloat16(), z2.bfloat16(), 25, 25, 1)
    assert loss.dtype == torch.float32
    # +-2 in every pattern of 3 bits over 8 rows, twice: std > 1, covariances exactly 0
    signs = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)] * 2, dtype=torch.float32) * 4 - 2
    assert pretrain_vicreg.vicreg_loss(signs, signs, 25, 25, 1).item() == pytest.approx(0, abs=1e-6)
    assert pretrain_vicreg.vicreg_loss(signs, signs.flip(0), 25, 25, 1).item() > 1          # views disagree
    assert pretrain_vicreg.vicreg_loss(signs / 4, signs / 4, 25, 25, 1).item() > 1          # std 0.5 < 1
    correlated = torch.cat([signs, signs[:, :1]], dim=1)                                      # a duplicated dimension
    assert pretrain_vicreg.vicreg_loss(correlated, correlated, 25, 25, 1).item() > 1


def _built(*flags):
    args = pretrain_vicreg.get_args_parser().parse_args(
        ["--batch-size", "8", "--epochs", "1", "--in-chans", "1", "--expander", "32-16", "--aug", "base",
         "--precision", "fp32", *flags])  # float32: the loss is compared with lightly's to float32's tolerance
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    run = pretrain.in_memory(vars(args), images, "cpu")
    return args, run, pretrain_vicreg.build(args, run)


@pytest.mark.parametrize("weights", [(25, 25, 1), (3, 5, 2)])
def test_steps_loss_is_lightlys_on_the_networks_embeddings(weights):
    """The loss a step returns is lightly's loss, at the flags' weights, of encoder + expander on the two views
    the step drew (the same generator state, train-mode BatchNorm as in the step). Three different weights:
    a flag passed on to another term would fail."""
    lightly = lightly_vicreg()
    names = ("invariance", "variance", "covariance")
    args, run, method = _built(*[f for name, w in zip(names, weights) for f in (f"--{name}-weight", str(w))])
    batch = run.images[:8]
    generator = torch.Generator().set_state(run.generator.get_state())
    x1, x2 = pretrain.two_views(batch, run, generator=generator)
    online = torch.nn.Sequential(method.modules["encoder"], method.modules["expander"])
    with torch.no_grad():
        expected = lightly.VICRegLoss(lambda_param=weights[0], mu_param=weights[1], nu_param=weights[2])(
            online(x1), online(x2))
    loss, figures = method.step(batch, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert figures["lr"] > 0


def test_lars_as_bardes_et_al_biases_and_batchnorm_at_the_weights_lr_with_the_paper_schedule():
    args, run, method = _built("--epochs", "100")
    assert (args.optimizer, args.weight_decay, args.warmup_epochs, args.final_lr_fraction) == ("lars", 1e-6, 10, 1e-3)
    assert (args.invariance_weight, args.variance_weight, args.covariance_weight) == (25, 25, 1)
    assert isinstance(method.optimizer, optim.LARS)
    groups = method.optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0] and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[1]["params"]) > 0 and all(p.ndim > 1 for p in groups[0]["params"])
    total = run.total_steps
    warm = run.schedule.warmup_steps
    assert warm == 10 * run.steps_per_epoch
    lrs = [pretrain.set_lr(method.optimizer, run, i) for i in (warm - 1, total)]
    assert lrs == pytest.approx([1.6, 1.6e-3])                      # the peak after warm-up, 0.001 x it at the end
    assert all(g["lr"] == pytest.approx(1.6e-3) for g in groups)


def test_expander_must_be_layer_widths():
    parser = pretrain_vicreg.get_args_parser()
    pretrain_vicreg.check(parser.parse_args(["--expander", "64-64"]))
    for bad in ("8192x3", "0", ""):
        with pytest.raises(UserError, match="--expander"):
            pretrain_vicreg.check(parser.parse_args(["--expander", bad]))


@pytest.mark.parametrize("name,arch,expander,batch,lr,epochs", [
    ("vicreg", "resnet50", "8192-8192-8192", 2048, 1.6, 1000),
    ("cpu_vicreg", "resnet18", "1024-1024-1024", 64, 0.05, 28)])
def test_configs_parse(name, arch, expander, batch, lr, epochs):
    from common import augment
    args = cli.parse_args(pretrain_vicreg.get_args_parser(), ["--config", f"{REPO}/configs/{name}.yaml"])
    assert (args.arch, args.expander, args.batch_size, args.lr, args.epochs) == (arch, expander, batch, lr, epochs)
    assert args.lr == pytest.approx(0.2 * args.batch_size / 256)   # Bardes et al.'s rule, kept at batch 64
    assert (args.optimizer, args.aug, args.final_lr_fraction) == ("lars", "byol", 1e-3)
    assert (args.invariance_weight, args.variance_weight, args.covariance_weight) == (25, 25, 1)
    pretrain_vicreg.check(args)
    assert all(augment.views(args.aug, args.crop_scale))


def test_cli_pretrain_on_real_data(real_root, tmp_path):
    run = tmp_path / "vicreg"
    r = run_cli("pretrain_vicreg.py", "--data", "breastmnist", "--data-root", real_root, "--epochs", "2",
                "--max-steps", "3", "--batch-size", "16", *pretrain_vicreg.SMOKE_FLAGS, "--warmup-epochs", "1",
                "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "expander 32-32" in r.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["meta"]["method"] == "vicreg" and state["epoch"] == 2 and state["step"] == 6
    assert {"encoder", "expander"} <= set(state)
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1] and all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in log)
    assert log[0]["lr"] == pytest.approx(1.6)                       # the warm-up's last step reaches the peak
