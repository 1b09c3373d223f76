"""finetune_beit.py: which parameters train, the batched preprocessing against BeitImageProcessor,
and a tiny BEiT saved with save_pretrained fine-tuned through the CLI on real BreastMNIST."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

import finetune_beit
from common import errors, metrics, optim, rundir, supervised
from conftest import run_cli

TINY = dict(image_size=32, patch_size=8, num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
            intermediate_size=64, use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1)


@pytest.fixture(scope="module")
def tiny_beit(tmp_path_factory):
    """A randomly initialised BEiT saved as a Hugging Face folder (config, weights, processor)."""
    folder = str(tmp_path_factory.mktemp("beit") / "tiny")
    torch.manual_seed(0)
    BeitForImageClassification(BeitConfig(**TINY)).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def expected_trainable(cfg, k, n_out):
    """BEiT's parameter count by hand: k layers (attention q, k (no bias), v, o; two LayerNorms; MLP;
    layer-scale lambdas; a relative position bias table per layer), the pooler's LayerNorm, the classifier."""
    h, i, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    window = cfg["image_size"] // cfg["patch_size"]
    per_layer = (4 * h * h + 3 * h) + 4 * h + (2 * h * i + i + h) + 2 * h + ((2 * window - 1) ** 2 + 3) * heads
    return k * per_layer + 2 * h + (h * n_out + n_out)


@pytest.mark.parametrize("k, n_out", [(2, 1), (0, 3), (4, 1)])
def test_exactly_the_top_layers_pooler_and_classifier_train(k, n_out):
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**TINY, num_labels=n_out))
    n_trainable, n_total = finetune_beit.train_top_layers(model, k)
    assert n_total == sum(p.numel() for p in model.parameters())
    assert n_trainable == expected_trainable(TINY, k, n_out)
    top = tuple(f"beit.layers.{j}." for j in range(4 - k, 4)) + ("beit.pooler.", "classifier.")
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(top), name


def test_too_many_trainable_layers_is_refused():
    model = BeitForImageClassification(BeitConfig(**TINY))
    with pytest.raises(errors.UserError, match="more than the model's 4 layers"):
        finetune_beit.train_top_layers(model, 5)


def test_a_step_changes_the_trainable_weights_only():
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**TINY, num_labels=1))
    finetune_beit.train_top_layers(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prep = {"size": (32, 32), "mode": "bicubic", "scale": 1 / 255, "normalize": True, "mean": [0.5] * 3,
            "std": [0.5] * 3}
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 4)
    model.train()
    loss = supervised.classification_loss(model(pixel_values=finetune_beit.beit_inputs(images, prep)).logits, labels,
                                          metrics.BINARY)
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name


def _beit_steps(model, optimizer, steps=3):
    prep = {"size": (32, 32), "mode": "bicubic", "scale": 1 / 255, "normalize": True, "mean": [0.5] * 3,
            "std": [0.5] * 3}
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g)
        loss = supervised.classification_loss(model(pixel_values=finetune_beit.beit_inputs(images, prep)).logits,
                                              torch.tensor([0, 1] * 4), metrics.BINARY)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_layer_decay_1_trains_exactly_as_one_adamw_over_the_trainable_parameters():
    """--layer-decay's default: the shared LLRD groups (common/optim.py) change nothing, bit for bit."""
    weights = []
    for shared in (False, True):
        torch.manual_seed(0)
        model = BeitForImageClassification(BeitConfig(**TINY, num_labels=1))
        finetune_beit.train_top_layers(model, 2)
        if shared:
            layer_of, n_layers = finetune_beit.beit_layer_ids(model)
            params = optim.layer_decay_groups(model.named_parameters(), layer_of, n_layers, 1e-2, 1.0, 0.05)
            assert len(params) == 1
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(1)  # dropout / stochastic depth draws alike
        weights.append(_beit_steps(model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_layer_decay_gives_beit_layer_i_lr_times_decay_to_the_depth_minus_i():
    model = BeitForImageClassification(BeitConfig(**TINY, num_labels=1))
    finetune_beit.train_top_layers(model, 4)
    model.beit.embeddings.requires_grad_(True)
    layer_of, n_layers = finetune_beit.beit_layer_ids(model)
    groups = optim.layer_decay_groups(model.named_parameters(), layer_of, n_layers, 1e-3, 0.5, 0.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    layers = finetune_beit._beit_layers(model)
    for i, layer in enumerate(layers):  # layer i (from 0) of 4: 1e-3 x 0.5^(4 - i)
        assert all(lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (len(layers) - i)) for p in layer.parameters())
    assert lr_of[id(model.classifier.weight)] == 1e-3
    assert all(lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** 5) for p in model.beit.embeddings.parameters())


@pytest.mark.parametrize("flag, resample, side", [("breastmnist", 3, 224), ("pneumoniamnist", 2, 224),
                                                  ("breastmnist", 3, 100), ("breastmnist", 0, 224)])
def test_batched_preprocessing_matches_the_processor_on_real_images(real_root, flag, resample, side):
    """BeitImageProcessor (PIL, per image) and beit_inputs (one batched tensor op) on the same real
    images, as RGB as the processor gets them: equal within 1e-3 (one grey level is 7.8e-3)."""
    with np.load(os.path.join(real_root, f"{flag}.npz")) as npz:
        images = npz["test_images"][:24]
    processor = BeitImageProcessor(size={"height": side, "width": side}, resample=resample)
    expected = processor(images=[np.repeat(im[:, :, None], 3, axis=2) for im in images],
                         return_tensors="pt")["pixel_values"]
    prep = {"size": (side, side), "mode": finetune_beit.RESAMPLE[resample], "scale": processor.rescale_factor,
            "normalize": True, "mean": processor.image_mean, "std": processor.image_std}
    ours = finetune_beit.beit_inputs(torch.from_numpy(images)[:, None], prep)
    assert ours.shape == expected.shape == (24, 3, side, side)
    assert (ours - expected).abs().max().item() < 1e-3


def test_preprocessing_of_rgb_images_matches_too():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    processor = BeitImageProcessor()
    expected = processor(images=list(rgb), return_tensors="pt")["pixel_values"]
    prep = {"size": (224, 224), "mode": "bicubic", "scale": 1 / 255, "normalize": True, "mean": [0.5] * 3,
            "std": [0.5] * 3}
    ours = finetune_beit.beit_inputs(torch.from_numpy(rgb).permute(0, 3, 1, 2), prep)
    assert (ours - expected).abs().max().item() < 1e-3


def test_float_path_of_other_devices_is_within_one_grey_level(real_root):
    """The non-CPU resize (float kernels, Pillow's pass order and rounding), run here on the CPU."""
    with np.load(os.path.join(real_root, "pneumoniamnist.npz")) as npz:
        images = torch.from_numpy(npz["test_images"][:32])[:, None].expand(-1, 3, -1, -1)
    exact = finetune_beit.resize_like_pil(images, (224, 224), "bicubic")
    x = torch.nn.functional.interpolate(images.float(), size=(28, 224), mode="bicubic", antialias=True)
    x = torch.nn.functional.interpolate(x.round().clamp(0, 255), size=(224, 224), mode="bicubic", antialias=True)
    diff = (x.round().clamp(0, 255) - exact.float()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.002


def test_cli_fine_tunes_a_tiny_beit_on_real_breastmnist(real_root, tiny_beit, tmp_path):
    out = tmp_path / "run"
    r = run_cli("finetune_beit.py", "--model", tiny_beit, "--data", "breastmnist", "--data-root", real_root,
                "--trainable-layers", "2", "--epochs", "2", "--batch-size", "64", "--max-steps", "2",
                "--balance", "0.4", "--positive-class", "0", "--tensorboard", "--precision", "fp32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("metrics.json", "predictions.npz", "roc.png", "confusion.png", "log.jsonl", "args.yaml",
                 "checkpoint_seed0.pt"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    # the dataset's own description: names, hash, and the positive class asked for
    assert result["class_names"] == ["malignant", "normal, benign"] and len(result["data_hash"]) == 32
    assert result["positive_class"] == {"index": 0, "name": "malignant"}
    assert (out / "tensorboard").is_dir() and os.listdir(out / "tensorboard")
    run = result["per_seed"][0]
    assert run["train_images"] == 147 + 220  # 60/40 of BreastMNIST's 147 malignant, 399 benign
    assert run["trainable_params"] == expected_trainable(TINY, 2, 1)
    assert f"trainable parameters {run['trainable_params']:,}" in r.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    epoch_lines = [line for line in r.stdout.splitlines() if line.startswith("seed 0 epoch ")]  # live feedback
    assert [line.split(":")[0] for line in epoch_lines] == ["seed 0 epoch 1/2", "seed 0 epoch 2/2"]
    assert f"val AUC {log[1]['val_auc']:.4f}" in epoch_lines[1]
    assert run["best_epoch"] == int(np.argmax([e["val_auc"] for e in log]))

    # the checkpoint: trainable weights only (one logit for the binary task) + the config
    ckpt = rundir.load_checkpoint(str(out / "checkpoint_seed0.pt"))
    names = set(ckpt["trainable"])
    assert names and all(n.startswith(("beit.layers.2.", "beit.layers.3.", "beit.pooler.", "classifier.")) for n in names)
    assert ckpt["trainable"]["classifier.weight"].shape == (1, TINY["hidden_size"])
    assert ckpt["config"]["num_hidden_layers"] == 4

    # ... and it rebuilds the fine-tuned model: same test scores as the run wrote
    preds = np.load(out / "predictions.npz")
    model = finetune_beit.load_finetuned(str(out / "checkpoint_seed0.pt"))
    prep = finetune_beit.load_processor(tiny_beit)
    with np.load(os.path.join(real_root, "breastmnist.npz")) as npz:
        test_images = torch.from_numpy(npz["test_images"])[:, None]
    forward = finetune_beit.beit_forward(model, prep, contextlib.nullcontext)
    scores = supervised.probabilities(model, test_images, metrics.BINARY, forward, 64)
    assert np.allclose(scores, preds["y_score"], atol=1e-5)
    assert abs(metrics.auc(preds["y_true"], preds["y_score"], metrics.BINARY) - result["mean"]["auc"]) < 1e-9


def test_offline_hub_id_is_one_line_error(real_root, tmp_path):
    r = run_cli("finetune_beit.py", "--data", "breastmnist", "--data-root", real_root, "--out", str(tmp_path / "r"),
                env={"HF_HOME": str(tmp_path / "hf")})  # an empty cache: nothing to fall back on
    assert r.returncode == 2, r.stderr[-1000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "microsoft/beit-large-patch16-224" in lines[0] and "--model" in lines[0]
    assert not (tmp_path / "r").exists()  # nothing written before the model could be had


def test_bad_beit_folder_is_one_line_error(real_root, tmp_path):
    (tmp_path / "notbeit").mkdir()
    r = run_cli("finetune_beit.py", "--model", str(tmp_path / "notbeit"), "--data", "breastmnist",
                "--data-root", real_root, "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-1000:]
    assert "notbeit" in r.stderr
