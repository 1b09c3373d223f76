"""evaluate.py's additions for papers 002 and 003: --freeze up to a stage, the head-first recipe
with an LR range test and 1cycle, --train-aug / --tta, --saliency, --resize and --precise-bn."""
import json

import numpy as np
import pytest
import torch

import evaluate
from common import data, models, supervised
from common.errors import UserError


def _args(tmp_path, *flags):
    args = evaluate.get_args_parser().parse_args(
        ["--mode", "finetune", "--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-steps", "2",
         "--out", str(tmp_path), *flags])
    return evaluate.resolve_args(args)


def _splits(n=(24, 16, 16)):
    """Small random 1-channel binary splits, every class present."""
    g = torch.Generator().manual_seed(0)
    make = lambda k: data.Split(torch.randint(0, 256, (k, 1, 28, 28), dtype=torch.uint8, generator=g),
                                torch.arange(k) % 2, "synthetic", "binary-class", 2)
    return [make(k) for k in n]


def _finetune(args, encoder, log=None):
    """evaluate.finetune on the small splits: (y_score, info, model)."""
    train, val, test = _splits()
    records = [] if log is None else log
    result, model = evaluate.finetune(args, encoder, supervised.Examples(train.images, train.labels), val, test,
                                      "binary-class", 2, 0, torch.device("cpu"), records.append,
                                      evaluate.resolve_precision(args, "cpu", train.images))
    return result.y_score, result.info, model


def _encoder():
    torch.manual_seed(0)
    return models.build_encoder("resnet18", "imagenet", 3)


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------- --freeze
@pytest.mark.parametrize("stage, trained", [
    ("none", ["stem", "layer1", "layer2", "layer3", "layer4"]),
    ("stem", ["layer1", "layer2", "layer3", "layer4"]),
    ("layer2", ["layer3", "layer4"]),
    ("layer4", []),
])
def test_freeze_through_leaves_exactly_the_later_stages_trainable(stage, trained):
    encoder = _encoder()
    n = models.freeze_through(encoder, stage)
    stage_of = lambda name: "stem" if name.split(".")[0] in ("conv1", "bn1") else name.split(".")[0]
    assert [s for s in models.STAGES if any(stage_of(k) == s and p.requires_grad
                                            for k, p in encoder.named_parameters())] == trained
    assert n == sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def test_freeze_layer3_trains_exactly_layer4_and_the_head(tmp_path):
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    _, info, model = _finetune(_args(tmp_path, "--freeze", "layer3"), encoder)
    changed = _changed(before, model[0].state_dict())
    assert changed and all(k.startswith("layer4.") for k in changed)       # paper 002: "layer4 + fc"
    assert {"layer4.0.conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_mean"} <= changed
    assert info["trainable_params"] == sum(p.numel() for p in encoder.layer4.parameters()) + 512 * 2 + 2
    assert model[1].weight.requires_grad


def test_freeze_layer4_trains_the_head_alone_and_frozen_bn_train_updates_statistics(tmp_path):
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    _finetune(_args(tmp_path, "--freeze", "layer4"), encoder)
    assert not _changed(before, encoder.state_dict())                     # weights and BN statistics

    encoder = _encoder()
    _finetune(_args(tmp_path, "--freeze", "layer4", "--frozen-bn", "train"), encoder)
    changed = _changed(before, encoder.state_dict())
    assert "bn1.running_mean" in changed
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


# ---------------------------------------------------------------- paper 003's recipe
def test_head_epochs_train_the_head_alone_first(tmp_path, monkeypatch):
    seen = []
    real = supervised.train_select

    def spy(model, optimizer, train, val, task, seed, schedule, *rest, **kw):
        encoder_trainable = [p.requires_grad for p in model[0].parameters()]
        seen.append((schedule.epochs, any(encoder_trainable), all(encoder_trainable),
                     {id(p) for g in optimizer.param_groups for p in g["params"]}))
        return real(model, optimizer, train, val, task, seed, schedule, *rest, **kw)
    monkeypatch.setattr(supervised, "train_select", spy)
    log = []
    _, info, model = _finetune(_args(tmp_path, "--head-epochs", "1", "--epochs", "2"), _encoder(), log)
    (head_epochs, head_any, _, head_params), (epochs, _, main_all, _) = seen
    assert head_epochs == 1 and not head_any and head_params == {id(p) for p in model[1].parameters()}
    assert epochs == 2 and main_all                                        # then all layers
    assert [r.get("phase") for r in log] == ["head", None, None] and "head_val_auc" in info


def test_lr_auto_runs_a_range_test_inside_its_sweep_and_1cycle_runs(tmp_path):
    args = _args(tmp_path, "--lr", "auto", "--lr-range", "1e-5", "1e-1", "6", "--lr-schedule", "1cycle")
    y_score, info, _ = _finetune(args, _encoder())
    assert 1e-5 <= info["lr_found"] <= 1e-1
    sweep = json.load(open(tmp_path / "lr_range_seed0.json"))
    assert sweep["chosen"] == info["lr_found"] and info["lr_found"] in sweep["lrs"]
    assert (tmp_path / "lr_range_seed0.png").stat().st_size > 0
    assert np.allclose(y_score.sum(axis=1), 1)


def test_tta_averages_k_augmented_passes(tmp_path, monkeypatch):
    calls = []
    real = supervised.probabilities

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out)
        return out
    monkeypatch.setattr(supervised, "probabilities", spy)
    # a small lr keeps the barely trained model's probabilities away from 0 and 1
    y_tta, _, _ = _finetune(_args(tmp_path, "--train-aug", "paper003", "--tta", "3", "--lr", "1e-5"), _encoder())
    test_passes = calls[-6:-3]  # after the per-epoch validation passes; then the validation split's 3 for its threshold
    assert np.allclose(y_tta, np.mean(test_passes, axis=0)) and np.allclose(y_tta.sum(axis=1), 1)
    assert not np.allclose(test_passes[0], test_passes[1])     # each pass is augmented differently
    calls.clear()
    y_plain, _, _ = _finetune(_args(tmp_path, "--train-aug", "paper003", "--lr", "1e-5"), _encoder())
    assert y_plain.shape == y_tta.shape and not np.allclose(y_plain, y_tta)


@pytest.mark.parametrize("flags, needle", [
    (["--tta", "3"], "--train-aug paper003"),
    (["--mode", "linear_probe", "--freeze", "layer3"], "--freeze applies to --mode finetune"),
    (["--mode", "knn", "--lr", "auto"], "--lr auto applies"),
    (["--head-epochs", "-1"], "must be 0 or more"),
    (["--mode", "linear_probe", "--val-every", "5"], "--val-every applies to --mode finetune"),
])
def test_inconsistent_flags_are_refused(tmp_path, flags, needle):
    with pytest.raises(UserError, match=needle.replace("+", r"\+")):
        _args(tmp_path, *flags)


# ---------------------------------------------------------------- --saliency, --resize, the step schedule
def test_saliency_maps_of_the_fine_tuned_model_are_saved_for_the_first_test_images(tmp_path):
    args = _args(tmp_path, "--saliency", "3", "--stem", "small")
    encoder = models.build_encoder("resnet18", "small", 3)
    _, _, model = _finetune(args, encoder)
    test = _splits()[2]
    evaluate.write_saliency(args, model, test, evaluate.resolve_precision(args, "cpu", test.images))
    maps = np.load(tmp_path / "saliency.npz")
    assert maps["gradcam"].shape == maps["occlusion"].shape == (3, 28, 28)
    assert np.array_equal(maps["images"], test.images[:3].numpy())
    assert np.array_equal(maps["class_idx"], test.labels[:3].numpy())
    assert str(maps["layer"]) == "layer4"  # the small stem keeps layer4 at 4x4: deep enough to locate
    # the model's prediction beside the true class, for the grid's labels (scripts/report.py)
    expected = supervised.probabilities(model, test.images[:3], "binary-class",
                                        lambda x: model(data.to_input(x, 3))).argmax(axis=1)
    assert np.array_equal(maps["predicted"], expected)
    assert 0 <= maps["gradcam"].min() and maps["gradcam"].max() <= 1 + 1e-6
    with pytest.raises(UserError, match="--saliency applies to --mode finetune"):
        evaluate.resolve_args(evaluate.get_args_parser().parse_args(["--saliency", "2", "--out", str(tmp_path)]))


def test_resize_upsamples_with_nearest_neighbours():
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2)
    up = data.to_input(x, 1, resize=4)
    assert up.shape == (1, 1, 4, 4)
    assert torch.equal(up[0, 0, :2, :2], torch.full((2, 2), up[0, 0, 0, 0].item()))  # each pixel a 2x2 block
    assert torch.equal(data.to_input(x, 1, resize=2), data.to_input(x, 1))


def test_step_schedule_is_medmnist_v2s_tenfold_drops_at_half_and_three_quarters():
    from common import optim
    lrs = [optim.learning_rate("step", s, 100, 1e-3) for s in range(100)]
    assert lrs[49] == 1e-3 and abs(lrs[50] - 1e-4) < 1e-12 and abs(lrs[74] - 1e-4) < 1e-12
    assert abs(lrs[75] - 1e-5) < 1e-13 and abs(lrs[99] - 1e-5) < 1e-13
    assert optim.learning_rate("linear", 0, 10, 2.0) == 2.0 and optim.learning_rate("linear", 5, 10, 2.0) == 1.0


# ---------------------------------------------------------------- --precise-bn
def test_precise_bn_defaults_on_for_both_fine_tuning_modes(tmp_path):
    assert _args(tmp_path, "--mode", "fewshot").precise_bn == "on"
    assert _args(tmp_path).precise_bn == "on"
    assert _args(tmp_path, "--precise-bn", "off").precise_bn == "off"  # paper 001's fine-tuning
    with pytest.raises(UserError, match="--precise-bn applies to --mode finetune"):
        _args(tmp_path, "--mode", "linear_probe", "--precise-bn", "on")


def test_precise_bn_runs_before_each_validation(tmp_path, monkeypatch):
    calls = []
    real = supervised.recompute_bn_stats
    monkeypatch.setattr(supervised, "recompute_bn_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    _finetune(_args(tmp_path, "--epochs", "2", "--precise-bn", "on"), _encoder())
    assert len(calls) == 2
    _finetune(_args(tmp_path, "--epochs", "2", "--precise-bn", "off"), _encoder())
    assert len(calls) == 2


# ---------------------------------------------------------------- splits in pinned host memory
class HostOnly:
    """A split's images that only data.batch may read, as with a split in pinned host memory: indexing
    them directly (a slice or gather on the wrong device) fails."""

    def __init__(self, images):
        self.images, self.shape = images, images.shape

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        raise AssertionError("split images indexed directly instead of through data.batch")


@pytest.mark.parametrize("flags", [["--mode", "finetune", "--precise-bn", "on", "--saliency", "2"],
                                   ["--mode", "fewshot", "--shots", "4", "--lr", "auto",
                                    "--lr-range", "1e-4", "1", "5"],
                                   ["--mode", "linear_probe", "--probe", "sgd"], ["--mode", "linear_probe"],
                                   ["--mode", "knn"]], ids=lambda f: f[1] + (f"-{f[3]}" if len(f) > 3 else ""))
def test_every_batch_and_feature_pass_goes_through_data_batch(tmp_path, monkeypatch, flags):
    real_batch, calls = data.batch, []

    def batch(images, index, device):
        calls.append(index)
        return real_batch(images.images if isinstance(images, HostOnly) else images, index, device)
    monkeypatch.setattr(data, "batch", batch)
    args = evaluate.resolve_args(evaluate.get_args_parser().parse_args(
        ["--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--stem", "small", "--out", str(tmp_path),
         *flags]))
    splits = dict(zip(("train", "val", "test"), _splits()))
    for split in splits.values():
        split.images = HostOnly(split.images)
    result = evaluate.run_seed(args, 0, splits, None, torch.device("cpu"), lambda record: None,
                               evaluate.resolve_precision(args, "cpu", splits["train"].images))
    assert result.y_score.shape == (16, 2) and np.isfinite(result.y_score).all() and calls


@pytest.mark.parametrize("stage, blocks", [("stem", range(0, 12)), ("layer2", range(6, 12)), ("layer4", [])])
def test_freeze_through_maps_a_vits_patch_embedding_and_block_quarters_onto_the_stages(stage, blocks):
    encoder = models.build_encoder("vit_tiny_patch16_224", "imagenet", 1, size=28)
    n = models.freeze_through(encoder, stage)
    trained = {k for k, p in encoder.named_parameters() if p.requires_grad}
    assert {int(k.split(".")[1]) for k in trained if k.startswith("blocks.")} == set(blocks)
    assert not any(k.startswith(("patch_embed", "cls_token", "pos_embed")) for k in trained)
    assert ("norm.weight" in trained) == bool(blocks)  # the final LayerNorm goes with layer4
    assert n == sum(p.numel() for p in encoder.parameters() if p.requires_grad)
