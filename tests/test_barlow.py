"""pretrain_barlow.py: the Barlow Twins loss, the sparsity penalty, further pretraining's frozen
parts, schedules, the LR range test, LARS, and the CLI chain into evaluate.py on real data."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision

import pretrain_barlow
from common import cli, models, pretrain
from common.errors import UserError
from conftest import REPO, run_cli, run_main


# ---------------------------------------------------------------- loss
def whitened(n=256, d=8, seed=0):
    """(n, d) embeddings with zero mean, unit (biased) variance and exactly uncorrelated columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))
    return (q * math.sqrt(n)).float()


def numpy_loss(z1, z2, lambd, eps=1e-5):
    """Direct NumPy computation of Zbontar et al. Eq. 1, element by element."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = (a[:, i] * b[:, j]).sum() / n
            total += (1 - c) ** 2 if i == j else lambd * c ** 2
    return total


def test_loss_is_zero_for_identical_decorrelated_embeddings_whatever_their_scale():
    z = whitened()
    assert pretrain_barlow.barlow_twins_loss(z, z, 5e-3).item() < 1e-6
    # the loss standardises each dimension along the batch: offsets and scales do not matter
    assert pretrain_barlow.barlow_twins_loss(3 * z + 5, z * torch.arange(1, 9), 5e-3).item() < 1e-6


def test_loss_grows_with_off_diagonal_correlation():
    base = whitened()
    losses = []
    for rho in (0.0, 0.25, 0.5, 0.75, 0.95):
        z = base.clone()
        z[:, 1] = rho * base[:, 0] + math.sqrt(1 - rho ** 2) * base[:, 1]  # corr(z0, z1) = rho
        loss = pretrain_barlow.barlow_twins_loss(z, z, lambd=0.1).item()
        assert loss == pytest.approx(0.1 * 2 * rho ** 2, abs=1e-4)      # C_01 = C_10 = rho
        losses.append(loss)
    assert losses == sorted(losses) and losses[-1] > losses[0] + 0.1
    # views that disagree pay the invariance term: C = -I gives (1 - (-1))^2 per dimension
    assert pretrain_barlow.barlow_twins_loss(base, -base, 5e-3).item() == pytest.approx(4 * 8, rel=1e-4)


@pytest.mark.parametrize("lambd", [5e-3, 1 / 8192, 1.0])
def test_loss_equals_a_direct_numpy_computation(lambd):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 6, generator=g)
    z2 = 0.7 * z1 + torch.randn(32, 6, generator=g)
    assert pretrain_barlow.barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(numpy_loss(z1, z2, lambd),
                                                                                     rel=1e-4)


def test_loss_gradient_reaches_both_branches_and_is_float32_under_autocast():
    z1, z2 = torch.randn(16, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    pretrain_barlow.barlow_twins_loss(z1, z2, 5e-3).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pretrain_barlow.barlow_twins_loss(z1.bfloat16(), z2.bfloat16(), 5e-3)
    assert loss.dtype == torch.float32


def test_lambda_accepts_fractions():
    args = pretrain_barlow.get_args_parser().parse_args(["--lambd", "1/8192"])
    assert args.lambd == pytest.approx(1 / 8192)


# ---------------------------------------------------------------- sparsity penalty (paper 003 Eq. 2)
def test_sparsity_penalty_values_and_gradients():
    w = torch.tensor([[3.0, -1.0, 0.5], [-4.0, 2.0, 0.0]], requires_grad=True)   # (out 2, in 3)
    l1 = pretrain_barlow.sparsity_penalty(w, "l1")
    assert l1.item() == pytest.approx(3 + 1 + 0.5 + 4 + 2 + 0)
    l1.backward()
    assert torch.equal(w.grad, torch.sign(w.detach()))
    w.grad = None
    l21 = pretrain_barlow.sparsity_penalty(w, "l21")        # column norms: 5, sqrt(5), 0.5
    assert l21.item() == pytest.approx(5 + math.sqrt(5) + 0.5)
    l21.backward()
    columns = w.detach() / w.detach().norm(dim=0, keepdim=True)
    torch.testing.assert_close(w.grad, columns)
    with pytest.raises(ValueError):
        pretrain_barlow.sparsity_penalty(w, "l2")


# ---------------------------------------------------------------- projector
def test_projector_from_spec():
    one = models.projector(512, "512")                      # paper 002's best: one Linear layer
    assert len(one) == 1 and isinstance(one[0], torch.nn.Linear) and one[0].weight.shape == (512, 512)
    deep = models.projector(2048, "64-64-32")               # Linear-BN-ReLU x2 + Linear
    assert [type(m).__name__ for m in deep] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert deep(torch.randn(4, 2048)).shape == (4, 32) and deep[-1].bias is None
    for bad in ("", "512-x", "0", "-5"):
        with pytest.raises(UserError, match="not a list of layer widths"):
            models.projector(512, bad)


# ---------------------------------------------------------------- further pretraining: frozen parts
def _args(*flags):
    return pretrain_barlow.get_args_parser().parse_args(
        ["--batch-size", "8", "--epochs", "2", "--projector", "32", "--aug", "base+vflip", "--out", "unused",
         "--lr", "1e-2", *flags])


def _barlow(args, in_chans=1):
    """pretrain_barlow's method, built by its build(args, run) (the encoder's weights from seed 0) over 24
    random images of `in_chans` channels, 2 steps per epoch; and the images."""
    args.in_chans = in_chans
    images = torch.randint(0, 256, (24, in_chans, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    return pretrain_barlow.build(args, pretrain.in_memory(vars(args), images, "cpu", steps=2)), images


def _run_epoch(method, images, epoch):
    """One epoch of 2 steps through the method's start_epoch and step; the projector trains. Returns the
    epoch's figures."""
    projector = method.modules["projector"]
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    figures = method.start_epoch(epoch)
    losses = [method.step(images[:8], 2 * epoch + i)[0] for i in range(2)]
    assert all(np.isfinite(loss.item()) for loss in losses)
    assert any(not torch.equal(before[k], v) for k, v in projector.state_dict().items())  # projector trained
    return figures


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_last_block_changes_only_that_block_and_frozen_bn_eval_keeps_running_stats():
    method, images = _barlow(_args("--trainable", "last-block"))
    encoder = method.modules["encoder"]
    before = _state(encoder)
    stats = _run_epoch(method, images, epoch=0)
    changed = _changed(before, encoder.state_dict())
    assert changed and all(k.startswith("layer4.1.") for k in changed)          # parameters and BN buffers
    assert "layer4.1.conv1.weight" in changed and "layer4.1.bn1.running_mean" in changed
    n_block = sum(p.numel() for p in encoder.layer4[1].parameters())
    assert stats["trainable_params"] == n_block + 512 * 32 and not stats["frozen_encoder"]


def test_frozen_bn_train_updates_running_stats_but_not_weights():
    method, images = _barlow(_args("--trainable", "last-block", "--frozen-bn", "train"))
    encoder = method.modules["encoder"]
    before = _state(encoder)
    _run_epoch(method, images, epoch=0)
    changed = _changed(before, encoder.state_dict())
    outside = {k for k in changed if not k.startswith("layer4.1.")}
    assert "bn1.running_mean" in outside and "layer1.0.bn1.running_var" in outside
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in outside)


def test_layer4_trains_all_of_layer4():
    method, images = _barlow(_args("--trainable", "layer4"))
    encoder = method.modules["encoder"]
    before = _state(encoder)
    _run_epoch(method, images, epoch=0)
    changed = _changed(before, encoder.state_dict())
    assert all(k.startswith("layer4.") for k in changed)
    assert any(k.startswith("layer4.0.") for k in changed) and any(k.startswith("layer4.1.") for k in changed)


def test_frozen_first_epoch_leaves_the_encoder_untouched_then_trains_it():
    method, images = _barlow(_args("--freeze-encoder-epochs", "1"), in_chans=3)
    encoder = method.modules["encoder"]
    before = _state(encoder)
    stats = _run_epoch(method, images, epoch=0)
    assert stats["frozen_encoder"] and stats["trainable_params"] == 512 * 32
    assert not _changed(before, encoder.state_dict())                          # weights and BN statistics
    _run_epoch(method, images, epoch=1)
    assert "conv1.weight" in _changed(before, encoder.state_dict())


def test_last_block_of_resnet50_is_its_bottleneck():
    encoder = models.build_encoder("resnet50")
    n = models.set_trainable(encoder, "last-block")
    block = encoder.layer4[-1]
    assert isinstance(block, torchvision.models.resnet.Bottleneck)
    assert [c.kernel_size for c in (block.conv1, block.conv2, block.conv3)] == [(1, 1), (3, 3), (1, 1)]
    assert n == sum(p.numel() for p in block.parameters())
    assert [name for name, p in encoder.named_parameters() if p.requires_grad] == \
        [f"layer4.2.{name}" for name, _ in block.named_parameters()]
    assert models.set_trainable(encoder, "none") == 0
    assert models.set_trainable(encoder, "all") == sum(p.numel() for p in encoder.parameters())


def test_oversample_index_repeats_a_class():
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    index = pretrain_barlow.oversample_index(labels, "1:10")
    assert len(index) == 6 + 9 * 2 and (labels[index] == 1).sum() == 20 and (labels[index] == 0).sum() == 4
    for bad, match in (("1-10", "CLASS:FACTOR"), ("7:2", "class 7 has 0 images"), ("1:0", "factor")):
        with pytest.raises(UserError, match=match):
            pretrain_barlow.oversample_index(labels, bad)


def test_barlowtwins_init_offline_is_a_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError) as e:
        models.load_encoder("barlowtwins", "resnet50")
    assert "torch.hub" in str(e.value) and "--init /path/to/resnet50.pth" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="--arch resnet50"):
        models.load_encoder("barlowtwins", "resnet18")


def test_barlowtwins_init_online_loads_the_hub_model(monkeypatch):
    torch.manual_seed(0)
    hub_model = torchvision.models.resnet50()                  # what the hub entry point returns
    calls = []
    monkeypatch.setattr(torch.hub, "load", lambda repo, name, **kw: (calls.append((repo, name)), hub_model)[1])
    encoder = models.load_encoder("barlowtwins", "resnet50")
    assert calls == [("facebookresearch/barlowtwins:main", "resnet50")]
    assert torch.equal(encoder.layer4[2].conv3.weight, hub_model.layer4[2].conv3.weight)


# ---------------------------------------------------------------- schedules, LR range test, LARS


# ---------------------------------------------------------------- the CLI, on real data, into evaluate.py
def test_cli_pretrain_then_evaluate_on_real_data(real_root, tmp_path, monkeypatch, capsys):
    run = tmp_path / "barlow"
    cmd = ("pretrain_barlow.py", "--data", "pneumoniamnist", "--data-root", real_root, "--epochs", "2",
           "--max-steps", "2", "--batch-size", "32", "--projector", "32-32", "--sparsity", "0.01",
           "--sparsity-norm", "l21", "--freeze-encoder-epochs", "1", "--trainable", "last-block",
           "--lr", "auto", "--lr-range", "1e-5", "1", "5", "--lr-schedule", "1cycle", "--oversample", "0:2",
           "--out", str(run))
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4 and state["meta"]["method"] == "barlow"
    assert state["meta"]["format"] == "medssl" and state["meta"]["arch"] == "resnet18"
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state["encoder"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    sweep = json.load(open(run / "lr_range.json"))
    assert 1e-5 <= state["lr"] <= 1 and state["lr"] == sweep["chosen"] and (run / "lr_range.png").stat().st_size > 0
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1] and [e["frozen_encoder"] for e in log] == [True, False]
    assert {"loss", "lr", "images_per_sec", "trainable_params"} <= set(log[0])
    assert log[0]["trainable_params"] < log[1]["trainable_params"] and all(e["loss"] > 0 for e in log)

    out = tmp_path / "probe"
    r = run_cli("evaluate.py", "--ckpt", str(run / "checkpoint.pt"), "--data", "breastmnist", "--data-root",
                real_root, "--mode", "linear_probe", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.load(open(out / "metrics.json"))
    assert 0 <= result["mean"]["auc"] <= 1 and "weighted_f1" in result["mean"]

    # a finished run is kept; the same command again is refused (in this process: the same main())
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, *cmd)
    assert stop.value.code == 2 and "finished run" in capsys.readouterr().err


def test_bad_flags_are_one_line_errors(real_root, tmp_path, monkeypatch, capsys):
    base = ["pretrain_barlow.py", "--data", "pneumoniamnist", "--data-root", real_root, "--out", str(tmp_path / "r")]
    for flags, needle in ((["--aug", "base+vlfip"], "--aug: unknown augmentation 'vlfip'"),  # refused while parsing
                          (["--init", "barlowtwins"], "--arch resnet50"),
                          (["--freeze-encoder-epochs", "3", "--epochs", "3"], "--freeze-encoder-epochs must be"),
                          (["--projector", "512-x"], "not a list of layer widths")):
        with pytest.raises(SystemExit) as stop:
            run_main(monkeypatch, *base, *flags)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()                               # refused before the run directory
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, *base, "--oversample", "1:x")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --oversample") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["paper002_barlow", "cpu_barlow", "paper003_further", "cpu_further",
                                  "paper002_barlow_finetune", "paper003_further_finetune"])
def test_configs_parse(name):
    import evaluate
    script = evaluate if name.endswith("finetune") else pretrain_barlow
    args = cli.parse_args(script.get_args_parser(), ["--config", f"{REPO}/configs/{name}.yaml"])
    if name == "paper003_further":
        assert args.lambd == pytest.approx(1 / 8192) and args.lr == "auto" and args.trainable == "last-block"
    if script is pretrain_barlow:
        from common import augment
        models.projector_sizes(args.projector)
        augment.views(args.aug, args.crop_scale)


def test_an_interrupted_run_resumes_exactly_and_reuses_its_found_lr(real_root, tmp_path, monkeypatch):
    def argv(out):
        return ["pretrain_barlow.py", "--data", "breastmnist", "--data-root", real_root, "--epochs", "2",
                "--max-steps", "2", "--batch-size", "16", "--projector", "32", "--lr", "auto",
                "--lr-range", "1e-5", "1", "4", "--lr-schedule", "1cycle", "--out", str(out)]
    run_main(monkeypatch, *argv(tmp_path / "straight"))

    real_phase = pretrain_barlow.start_phase

    def crash_in_epoch_1(*args):
        if args[-1] == 1:                              # the epoch argument
            raise KeyboardInterrupt
        return real_phase(*args)
    monkeypatch.setattr(pretrain_barlow, "start_phase", crash_in_epoch_1)
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, *argv(tmp_path / "resumed"))
    assert stop.value.code == 130
    monkeypatch.setattr(pretrain_barlow, "start_phase", real_phase)
    monkeypatch.setattr(pretrain_barlow, "lr_from_range_test", lambda *a: pytest.fail("the range test ran again"))
    run_main(monkeypatch, *argv(tmp_path / "resumed"))

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["lr"] == straight["lr"]
    for key in straight["encoder"]:
        assert torch.equal(straight["encoder"][key], resumed["encoder"][key]), key
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1]
