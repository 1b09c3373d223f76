"""--precision (common/precision.py): the rule of `auto` on each kind of CPU and on CUDA, forced values and
recorded ones; float32 outputs under bf16; evaluate.py's linear probe and kNN in bf16 against float32 on
real BreastMNIST, and a resumed evaluation keeping the precision of its finished seeds."""
import copy
import json
import os

import pytest
import torch
from conftest import run_main, stopping_at_seed

import evaluate
from common import data, metrics, models, precision, rundir, small_convs, supervised
from common.errors import UserError
from common.precision import Precision

FP32_CL, FP32, BF16_CL = Precision(False, True), Precision(False, False), Precision(True, True)
BF16_CPU = Precision(True, True, matmul_small_convs=True)  # bf16 on a CPU: tiny convolutions as matrix products


# ---------------------------------------------------------------- the rule
@pytest.mark.parametrize("native, expected", [
    (True, {28: FP32_CL, 47: FP32_CL, 48: BF16_CPU, 64: BF16_CPU, 127: BF16_CPU, 128: BF16_CPU, 224: BF16_CPU}),
    (False, {28: FP32_CL, 47: FP32_CL, 48: FP32, 64: FP32, 127: FP32, 128: FP32_CL, 224: FP32_CL}),
])
def test_auto_on_a_cpu_takes_bf16_only_where_it_is_native_and_from_48_px(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert {side: precision.resolve("auto", "cpu", side) for side in expected} == expected
    # a ViT: the same arithmetic, always contiguous, no convolution to rewrite
    vit = {side: precision.resolve("auto", "cpu", side, convolutional=False) for side in expected}
    assert vit == {side: Precision(chosen.bf16, False) for side, chosen in expected.items()}


@pytest.mark.parametrize("native", [True, False])
def test_forced_values_win_on_a_cpu_with_or_without_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert [precision.resolve("bf16", "cpu", side) for side in (28, 64, 224)] == [BF16_CPU] * 3
    # --precision fp32 is float32 as every earlier result was computed: channels_last at every side
    assert [precision.resolve("fp32", "cpu", side) for side in (28, 64, 224)] == [FP32_CL] * 3


def test_cuda_is_bf16_channels_last_where_the_gpu_has_bf16_at_every_side(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert [precision.resolve("auto", "cuda", side) for side in (28, 64)] == [BF16_CL, BF16_CL]
    assert precision.resolve("fp32", "cuda", 64) == FP32_CL
    assert precision.resolve("bf16", "cuda", 28, convolutional=False) == Precision(True, False)  # never matmul
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve("auto", "cuda", 224) == FP32_CL
    with pytest.raises(UserError, match="does not support bf16"):
        precision.resolve("bf16", "cuda", 224)


def test_recorded_values_win_over_the_request_and_round_trip(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    for chosen in (BF16_CL, FP32, Precision(True, False), BF16_CPU):
        assert precision.resolve("fp32", "cpu", 64, recorded=chosen.record()) == chosen
    assert BF16_CPU.record() == {"precision": "bf16", "channels_last": True, "matmul_small_convs": True}
    # a checkpoint from before the matrix products: it resumes without them
    assert precision.resolve("auto", "cpu", 28, recorded={"precision": "bf16", "channels_last": True}) == BF16_CL
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve("fp16", "cpu", 28)


# ---------------------------------------------------------------- float32 out of bf16 forwards
def test_bf16_forwards_return_float32_logits_features_and_losses():
    torch.manual_seed(0)
    encoder = models.build_encoder("resnet18", "small", 3).to(memory_format=torch.channels_last)
    model = torch.nn.Sequential(encoder, torch.nn.Linear(models.FEATURE_DIM["resnet18"], 2))
    inner = []
    model[1].register_forward_hook(lambda module, args, out: inner.append(out.dtype))
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    logits = evaluate.classifier_forward(model, 3, None, BF16_CL)(images)
    assert inner == [torch.bfloat16] and logits.dtype == torch.float32  # the head ran in bf16
    loss = supervised.classification_loss(logits, torch.tensor([0, 1, 0, 1]), metrics.BINARY)
    assert loss.dtype == torch.float32
    fp32_logits = evaluate.classifier_forward(model, 3, None, FP32_CL)(images)
    assert inner[-1] == torch.float32 and not torch.equal(logits, fp32_logits)
    assert torch.allclose(logits, fp32_logits, rtol=0.05, atol=0.05 * fp32_logits.abs().max().item())
    feats = models.features(encoder, images, 3, precision=BF16_CL)
    assert feats.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    # without a Precision: channels_last and no autocast of its own (the pretraining kNN monitor)
    assert torch.equal(models.features(encoder, images, 3), models.features(encoder, images, 3, precision=FP32_CL))


def test_knn_auc_of_bf16_features_is_that_of_float32_at_every_k(real_root):
    """The same random-init encoder's features in bf16 and in float32, kNN-scored at each k evaluate.py
    tries: a k chosen on validation may differ between the two, the AUC at a given k hardly does."""
    splits = {s: data.load_split("breastmnist", s, 28, real_root, "cpu", 3) for s in ("train", "test")}
    torch.manual_seed(0)
    encoder = models.build_encoder("resnet18", "imagenet", 3).to(memory_format=torch.channels_last)
    matmul = copy.deepcopy(encoder)  # layer3's and layer4's convolutions as matrix products (28 px: 2x2, 1x1)
    assert small_convs.as_matmul(matmul, 3, 28) == 10
    feats = {p: {s: models.features(encoder if p != BF16_CPU else matmul, splits[s].images, 3, precision=p)
                 for s in splits} for p in (FP32_CL, BF16_CL, BF16_CPU)}
    for p in (BF16_CL, BF16_CPU):
        assert torch.nn.functional.cosine_similarity(feats[FP32_CL]["test"], feats[p]["test"]).min() > 0.999
    train, y_test = splits["train"], splits["test"].labels.numpy()
    for k in evaluate.KNN_K:
        aucs = [metrics.auc(y_test, metrics.knn_scores(f["train"], train.labels, f["test"], k, metrics.BINARY, 2),
                            metrics.BINARY) for f in feats.values()]
        assert max(aucs) - min(aucs) < 0.02, (k, aucs)


# ---------------------------------------------------------------- evaluate.py end to end
def evaluate_in_process(monkeypatch, out, *flags):
    """evaluate.py's main() in this process; metrics.json's dict. The run directory's lock is let go."""
    try:
        run_main(monkeypatch, "evaluate.py", *flags, "--out", out)
    finally:
        fd = rundir._locks.pop(os.path.realpath(out), None)
        if fd is not None:
            os.close(fd)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("mode, score", [("linear_probe", lambda r: r["mean"]["auc"]),
                                         # kNN: the validation AUC of the chosen k (one k's test AUC may
                                         # move more when bf16 tips the choice to a neighbouring k)
                                         ("knn", lambda r: r["per_seed"][0]["val_auc"])])
def test_bf16_evaluation_is_recorded_and_scores_as_float32_does(real_root, tmp_path, monkeypatch, capsys, mode, score):
    base = ["--data", "breastmnist", "--data-root", real_root, "--mode", mode, "--seeds", "1"]
    runs = {p: evaluate_in_process(monkeypatch, str(tmp_path / p), *base, "--precision", p) for p in ("fp32", "bf16")}
    printed = capsys.readouterr().out
    assert "precision: bf16, channels_last, tiny convolutions as matrix products (--precision bf16)" in printed
    assert "precision: fp32, channels_last (--precision fp32)" in printed
    for p, run in runs.items():
        assert run["precision"] == {"precision": p, "channels_last": True, "matmul_small_convs": p == "bf16"}
        assert run["per_seed"][0][supervised.PRECISION_KEY] == run["precision"]
    assert runs["bf16"]["mean"]["auc"] != runs["fp32"]["mean"]["auc"]  # bf16 did compute
    assert abs(score(runs["bf16"]) - score(runs["fp32"])) < 0.02


def test_a_resumed_evaluation_keeps_the_precision_of_its_finished_seeds(real_root, tmp_path, monkeypatch, capsys):
    """Seed 0 ran where auto gave bf16 (a CPU with native bf16, 48 px); the resume on a CPU without it, where
    auto gives float32, contiguous, goes on in bf16, channels_last, and metrics.json pools them as such."""
    out = str(tmp_path / "knn")
    flags = ["--data", "breastmnist", "--data-root", real_root, "--mode", "knn", "--seeds", "2", "--resize", "48"]
    with monkeypatch.context() as m:
        m.setattr(precision, "native_bf16", lambda device: True)
        m.setattr(evaluate, "run_seed", stopping_at_seed(evaluate.run_seed, 1))  # seed 0 saved, unfinished
        with pytest.raises(SystemExit):  # cli.run_main's exit on Ctrl-C
            evaluate_in_process(monkeypatch, out, *flags)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    run = evaluate_in_process(monkeypatch, out, *flags)
    printed = capsys.readouterr().out
    assert "precision: bf16, channels_last, tiny convolutions as matrix products (--precision auto)" in printed
    assert ("precision: bf16, channels_last, tiny convolutions as matrix products (as seed 0 of this run; "
            "--precision auto gives fp32, contiguous") in printed
    assert run["precision"] == BF16_CPU.record()
    assert [s[supervised.PRECISION_KEY] for s in run["per_seed"]] == [BF16_CPU.record()] * 2


def test_a_seed_saved_before_precision_existed_resumes_as_it_ran(tmp_path, capsys):
    """float32, channels_last on the CPU (bf16 on a GPU that has it), whatever auto gives now; the BEiT's
    contiguous; no finished seed: the resolve of the command."""
    out = str(tmp_path)
    with open(supervised.seed_path(out, 3), "w") as f:
        json.dump({"seed": 3, "test": {"auc": 0.5}, "y_score": [[0.5, 0.5]], "y_score_dtype": "float64"}, f)
    assert supervised.seeds_precision(out, [3, 4], "bf16", "cpu", 64) == FP32_CL
    assert supervised.seeds_precision(out, [3, 4], "bf16", "cpu", 64, convolutional=False) == FP32
    assert supervised.seeds_precision(out, [4, 5], "bf16", "cpu", 64) == BF16_CPU
    assert supervised.seeds_precision(out, [4, 5], "bf16", "cpu", 64, convolutional=False) == Precision(True, False)
    assert ("as seed 3 of this run; --precision bf16 gives bf16, channels_last, tiny convolutions as matrix "
            "products here") in capsys.readouterr().out


def test_the_parity_study_runs_each_seed_in_both_precisions_end_to_end(tmp_path):
    """scripts/precision_parity.sh --dry-run: for every pretraining seed, both precisions pretrain and evaluate
    (probe and fine-tuning) in that precision, each evaluation on its own precision's encoder."""
    import subprocess
    from conftest import REPO
    r = subprocess.run(["bash", "scripts/precision_parity.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stderr
    commands = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("run ")]
    assert len(commands) == 3 * 2 * 3
    for p in ("fp32", "bf16"):
        for s in ("0", "1", "2"):
            mine = [c for c in commands if c[c.index("--precision") + 1] == p and c[c.index("--seed") + 1] == s]
            assert [c[1] for c in mine] == ["pretrain_byol.py", "evaluate.py", "evaluate.py"]
            encoder = mine[0][mine[0].index("--out") + 1] + "/checkpoint.pt"
            assert all(c[c.index("--ckpt") + 1] == encoder for c in mine[1:])
            assert {c[c.index("--mode") + 1] for c in mine[1:]} == {"linear_probe", "finetune"}
    assert not (tmp_path / "results").exists()
