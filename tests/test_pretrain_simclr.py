"""pretrain_simclr.py: the NT-Xent loss against a direct NumPy computation, and the CLI chain into
evaluate.py on real data. Resume after SIGKILL and the 2-process run: tests/test_resume.py, tests/test_ddp.py."""
import json

import numpy as np
import pytest
import torch

import pretrain_simclr
from conftest import run_cli


def numpy_nt_xent(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / t
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = np.exp(np.delete(sim[i], i))
        total += -(sim[i, partner] - np.log(others.sum()))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_equals_a_direct_numpy_computation(temperature):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = pretrain_simclr.nt_xent_loss(z1, z2, temperature)
    assert loss.item() == pytest.approx(numpy_nt_xent(z1.numpy(), z2.numpy(), temperature), rel=1e-5)


def test_nt_xent_falls_as_the_positives_align_and_reaches_both_views():
    g = torch.Generator().manual_seed(1)
    z1, noise = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    losses = [pretrain_simclr.nt_xent_loss(z1, z1 + s * noise, 0.5).item() for s in (4.0, 1.0, 0.25, 0.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # the floor: positives identical, negatives random; never below log(1) = 0
    assert losses[-1] > 0
    a, b = z1.clone().requires_grad_(), noise.clone().requires_grad_()
    pretrain_simclr.nt_xent_loss(a, b, 0.5).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_cli_pretrain_then_evaluate_on_real_data(real_root, tmp_path):
    run = tmp_path / "simclr"
    r = run_cli("pretrain_simclr.py", "--data", "breastmnist", "--data-root", real_root, "--epochs", "2",
                "--max-steps", "2", "--batch-size", "16", "--projector-hidden", "32", "--projector-out", "16",
                "--eval-every", "1", "--tensorboard", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "left" in r.stdout            # one formatted line per epoch
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["meta"]["method"] == "simclr" and state["epoch"] == 2 and state["step"] == 4
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1] and all(0 < e["loss"] < np.log(31) + 1 for e in log)
    assert all(0 <= e["knn_val_auc"] <= 1 for e in log)

    # TensorBoard: the per-epoch records and the per-step loss, read back from the event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"epoch/loss", "epoch/knn_val_auc", "step/loss", "step/lr"} <= set(tags)
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([e["loss"] for e in log], rel=1e-6)

    out = tmp_path / "probe"
    r = run_cli("evaluate.py", "--ckpt", str(run / "checkpoint.pt"), "--data", "breastmnist", "--data-root",
                real_root, "--mode", "linear_probe", "--seeds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert 0 <= json.load(open(out / "metrics.json"))["mean"]["auc"] <= 1


@pytest.mark.parametrize("name", ["simclr", "cpu_simclr"])
def test_configs_parse_and_name_valid_views(name):
    from common import augment, cli
    from conftest import REPO
    args = cli.parse_args(pretrain_simclr.get_args_parser(), ["--config", f"{REPO}/configs/{name}.yaml"])
    assert args.aug == "simclr" and args.temperature == 0.5
    first, second = augment.views(args.aug, args.crop_scale)
    assert first and second
