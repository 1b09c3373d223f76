import json
import os

import numpy as np
import pytest
import torch
import torchvision

import pretrain_byol
from common import ema, errors, pretrain
from conftest import run_cli, run_main, tiny_run


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


def test_the_target_update_is_the_ema_formula_and_copies_batchnorm_statistics():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    target = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    online(torch.randn(8, 3))                                   # online running statistics move
    before = target[0].weight.detach().clone()
    ema.update(target, online, 0.99)
    assert torch.allclose(target[0].weight, 0.99 * before + 0.01 * online[0].weight)
    assert torch.equal(target[1].running_mean, online[1].running_mean)          # copied, not averaged
    assert torch.equal(target[1].num_batches_tracked, online[1].num_batches_tracked)


def _byol(flags, tmp_path, epochs):
    """pretrain_byol's method (its build(args, run)) with small heads over 12 random 1-channel images,
    batch 4 (3 steps per epoch), and a Run of them for the common loop writing into tmp_path/run."""
    args = pretrain_byol.get_args_parser().parse_args(
        ["--batch-size", "4", "--epochs", str(epochs), "--aug", "byol", "--in-chans", "1", "--out", "unused",
         "--projector-hidden", "32", "--predictor-hidden", "32", "--projector-out", "16", *flags])
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    run = tiny_run(tmp_path / "run", args, images)
    return pretrain_byol.build(args, run), run


def test_target_is_updated_once_per_optimiser_step(monkeypatch, tmp_path):
    calls = []
    real = ema.update
    monkeypatch.setattr(ema, "update", lambda t, o, tau: (calls.append(tau), real(t, o, tau)))
    method, run = _byol([], tmp_path, epochs=1)
    steps = []
    real_step = method.optimizer.step
    method.optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    pretrain.train(method, run)
    assert len(steps) == 3 and calls == [0.99] * 2 * 3  # encoder + projector, once per step
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 1 and np.isfinite(log[0]["loss"]) and log[0]["images_per_sec"] > 0 and log[0]["ema"] == 0.99
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["epoch"] == 1 and state["meta"]["method"] == "byol"
    assert state["meta"]["modules"] == ["encoder", "projector", "predictor", "target_encoder", "target_projector"]


def test_cosine_ema_schedule_goes_from_tau_to_one(monkeypatch, tmp_path):
    assert ema.momentum("cosine", 0, 100, 0.99) == pytest.approx(0.99)
    assert ema.momentum("cosine", 50, 100, 0.99) == pytest.approx(0.995)
    assert ema.momentum("cosine", 100, 100, 0.99) == pytest.approx(1.0)
    # the step uses it: the momentum of steps 0, 1, 2 of 3
    calls = []
    real = ema.update
    monkeypatch.setattr(ema, "update", lambda t, o, tau: (calls.append(tau), real(t, o, tau)))
    method, run = _byol(["--ema-schedule", "cosine"], tmp_path, epochs=1)
    figures = [method.step(run.images[4 * i:4 * (i + 1)], i)[1]["ema"] for i in range(3)]
    assert figures == [pytest.approx(ema.momentum("cosine", i, 3, 0.99)) for i in range(3)]
    assert calls[::2] == calls[1::2] == figures and figures[0] < figures[1] < figures[2] < 1


def test_cli_pretrain_then_evaluate_on_real_data(real_root, tmp_path, monkeypatch, capsys):
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

    # a finished run is kept; the same command again is refused, and so is another command (in this
    # process: the same main())
    again = ("pretrain_byol.py", "--data", "pneumoniamnist", "--data-root", real_root, "--epochs", "1",
             "--max-steps", "2", "--batch-size", "32", "--projector-hidden", "64", "--predictor-hidden", "64",
             "--eval-every", "1", "--out", str(run))
    capsys.readouterr()
    for argv, needles in ((again, ["finished run"]), ((*again[:-2], "--lr", "0.01", "--out", str(run)),
                                                      ["different command", "lr"])):
        with pytest.raises(SystemExit) as stop:
            run_main(monkeypatch, *argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and all(needle in err for needle in needles), err
    assert torch.equal(torch.load(run / "checkpoint.pt", weights_only=True)["encoder"]["conv1.weight"],
                       state["encoder"]["conv1.weight"])


def test_non_finite_loss_stops_with_the_step_named(monkeypatch, tmp_path):
    calls = []
    real = pretrain_byol.byol_loss

    def loss_with_nan(p, z):  # the fifth step's loss (the second of epoch 1) is NaN
        calls.append(1)
        return real(p, z) * (float("nan") if len(calls) in (9, 10) else 1.0)
    monkeypatch.setattr(pretrain_byol, "byol_loss", loss_with_nan)
    method, run = _byol([], tmp_path, epochs=2)
    with pytest.raises(errors.UserError, match=r"loss became nan at step 4 \(epoch 1\).*last good checkpoint"):
        pretrain.train(method, run)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1   # epoch 0's, kept
