import functools
import json
import os

import numpy as np
import pytest
import torch
import torchvision

import pretrain_byol
from common import augment, cli, models, optim, pretrain
from conftest import run_cli, tiny_run


def test_byol_loss_values_and_symmetry_of_scale():
    p = torch.randn(8, 16)
    assert pretrain_byol.byol_loss(p, p).abs().max() < 1e-6            # same direction: 0
    assert torch.isclose(pretrain_byol.byol_loss(p, -p), torch.tensor(4.0))  # opposite: 4
    assert torch.isclose(pretrain_byol.byol_loss(p, 3 * p), pretrain_byol.byol_loss(p, p), atol=1e-6)
    e1, e2 = torch.eye(2)[:1], torch.eye(2)[1:]
    assert torch.isclose(pretrain_byol.byol_loss(e1, e2), torch.tensor(2.0))  # orthogonal: 2
    # normalised MSE: equals ||p/|p| - z/|z|||^2 averaged over the batch
    z = torch.randn(8, 16)
    direct = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert torch.isclose(pretrain_byol.byol_loss(p, z), direct, atol=1e-5)


def test_no_gradient_flows_into_the_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    pretrain_byol.byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_update_target_is_the_ema_formula():
    online, target = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = target.weight.detach().clone()
    pretrain_byol.update_target(target, online, 0.99)
    assert torch.allclose(target.weight, 0.99 * before + 0.01 * online.weight)


def _byol(args, steps_per_epoch, tmp_path, epochs):
    """BYOL's step over tiny networks on random images, and a Run of them for the common loop."""
    encoder = models.build_encoder(in_chans=1)
    projector, predictor = models.mlp(512, 32, 16), models.mlp(16, 32, 16)
    target_encoder, target_projector = models.build_encoder(in_chans=1), models.mlp(512, 32, 16)
    online = torch.nn.Sequential(encoder, projector, predictor)
    nets = pretrain_byol.Networks(online, encoder, projector, target_encoder, target_projector)
    optimizer = torch.optim.Adam([*encoder.parameters(), *projector.parameters(), *predictor.parameters()], lr=1e-3)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    run = tiny_run(tmp_path / "run", images, steps_per_epoch, epochs=epochs, batch_size=4, in_chans=1)
    step = functools.partial(pretrain_byol.train_step, args, nets, optimizer, augment.views(args.aug), run.generator,
                             steps_per_epoch)
    modules = {"encoder": encoder, "projector": projector, "predictor": predictor,
               "target_encoder": target_encoder, "target_projector": target_projector}
    return pretrain.Method("byol", modules, optimizer, step), run


def test_target_is_updated_once_per_optimiser_step(monkeypatch, tmp_path):
    args = pretrain_byol.get_args_parser().parse_args(["--batch-size", "4", "--epochs", "1", "--aug", "byol",
                                                       "--in-chans", "1", "--out", "unused"])
    calls = []
    real = pretrain_byol.update_target
    monkeypatch.setattr(pretrain_byol, "update_target", lambda t, o, tau: (calls.append(tau), real(t, o, tau)))
    method, run = _byol(args, 3, tmp_path, epochs=1)
    steps = []
    real_step = method.optimizer.step
    method.optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    pretrain.train(method, run)
    assert len(steps) == 3 and len(calls) == 2 * 3  # encoder + projector, once per step
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 1 and np.isfinite(log[0]["loss"]) and log[0]["images_per_sec"] > 0 and log[0]["ema"] == 0.99
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["epoch"] == 1 and state["meta"]["method"] == "byol"


def test_cosine_ema_schedule_goes_from_tau_to_one():
    assert optim.cosine(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert optim.cosine(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert optim.cosine(100, 100, 0.99, 1.0) == pytest.approx(1.0)


def test_cli_pretrain_then_evaluate_on_real_data(real_root, tmp_path):
    run = tmp_path / "byol"
    r = run_cli("pretrain_byol.py", "--data", "pneumoniamnist", "--data-root", real_root, "--epochs", "1",
                "--max-steps", "2", "--batch-size", "32", "--projector-hidden", "64", "--predictor-hidden", "64",
                "--eval-every", "1", "--out", str(run))
    assert r.returncode == 0, r.stderr
    # the checkpoint holds plain tensors and values, and its encoder is torchvision's resnet18 minus fc
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2 and state["meta"]["method"] == "byol"
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state["encoder"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert len(log) == 1 and {"loss", "lr", "images_per_sec", "knn_val_auc"} <= set(log[0])
    assert 0 < log[0]["loss"] <= 8 and 0 <= log[0]["knn_val_auc"] <= 1

    for mode, extra in (("linear_probe", []), ("finetune", ["--epochs", "1", "--max-steps", "1"])):
        out = tmp_path / mode
        r = run_cli("evaluate.py", "--ckpt", str(run / "checkpoint.pt"), "--data", "breastmnist",
                    "--data-root", real_root, "--mode", mode, "--seeds", "2", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        result = json.load(open(out / "metrics.json"))
        assert result["n"] == 2 and [s["seed"] for s in result["per_seed"]] == [0, 1]
        assert 0 <= result["mean"]["auc"] <= 1 and set(result["mean"]) >= {"auc", "acc", "f1", "weighted_f1"}
        predictions = np.load(out / "predictions.npz")
        with np.load(os.path.join(real_root, "breastmnist.npz")) as npz:
            assert np.array_equal(predictions["y_true"], npz["test_labels"][:, 0])
        assert predictions["y_score"].shape == (156, 2) and predictions["y_score_per_seed"].shape == (2, 156, 2)
        assert (out / "roc.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
        assert "auc" in r.stdout and "±" in r.stdout

    # a finished run is kept; the same command again is refused, --overwrite redoes it
    again = ("pretrain_byol.py", "--data", "pneumoniamnist", "--data-root", real_root, "--epochs", "1",
             "--max-steps", "2", "--batch-size", "32", "--projector-hidden", "64", "--predictor-hidden", "64",
             "--eval-every", "1", "--out", str(run))
    r = run_cli(*again)
    assert r.returncode == 2 and "finished run" in r.stderr
    assert torch.equal(torch.load(run / "checkpoint.pt", weights_only=True)["encoder"]["conv1.weight"],
                       state["encoder"]["conv1.weight"])
    r = run_cli(*again[:-2], "--lr", "0.01", "--out", str(run))
    assert r.returncode == 2 and "different command" in r.stderr and "lr" in r.stderr


def test_non_finite_loss_stops_with_the_step_named(monkeypatch, tmp_path):
    args = pretrain_byol.get_args_parser().parse_args(["--batch-size", "4", "--epochs", "2", "--aug", "byol",
                                                       "--in-chans", "1", "--out", "unused"])
    calls = []
    real = pretrain_byol.byol_loss

    def loss_with_nan(p, z):  # the fifth step's loss (the second of epoch 1) is NaN
        calls.append(1)
        return real(p, z) * (float("nan") if len(calls) in (9, 10) else 1.0)
    monkeypatch.setattr(pretrain_byol, "byol_loss", loss_with_nan)
    method, run = _byol(args, 3, tmp_path, epochs=2)
    with pytest.raises(cli.UserError, match=r"loss became nan at step 4 \(epoch 1\).*last good checkpoint"):
        pretrain.train(method, run)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1   # epoch 0's, kept
