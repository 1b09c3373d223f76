"""export.py: a checkpoint's encoder as one safetensors file and as timm's hub folder. Each file, loaded by
the lines export.py prints and the model card shows, gives the features MedSSL's own encoder gives."""
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from common import cli, errors, models, rundir
from conftest import real_file_root, run_cli


def run_main(monkeypatch, script, *args):
    """`python <script> args` in this process: its main() under cli.run_main, as its last lines do."""
    import importlib
    monkeypatch.setattr("sys.argv", [script, *map(str, args)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    cli.run_main(importlib.import_module(script.removesuffix(".py")).main)


def medssl_checkpoint(path, arch, stem="imagenet", in_chans=3, size=28, method="simclr", seed=0):
    """A checkpoint as common/pretrain.py writes it (encoder, projector, optimizer, meta, epoch), of an
    encoder with random weights, BatchNorm statistics and tokens (nothing left at its initial value)."""
    torch.manual_seed(seed)
    encoder = models.build_encoder(arch, stem, in_chans, size)
    with torch.no_grad():
        for name, t in {**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}.items():
            if t.is_floating_point():
                t.copy_(t.abs() + 0.5 if "running_var" in name else t + 0.05 * torch.randn_like(t))
    meta = {"format": "medssl", "format_version": models.FORMAT_VERSION, "method": method,
            "modules": ["encoder", "projector"], "input_scaling": models.INPUT_SCALING, "arch": arch, "stem": stem,
            "in_chans": in_chans, "size": size, **models.encoder_settings(arch, size),
            "args": {"data": "breastmnist", "epochs": 3, "init": "random"}}
    torch.save({"encoder": encoder.state_dict(), "projector": torch.nn.Linear(8, 4).state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "step": 30, "meta": meta}, path)
    return path


def export(monkeypatch, capsys, *args):
    """python export.py args, in this process; returns what it printed, split into the loading code
    per library."""
    capsys.readouterr()
    run_main(monkeypatch, "export.py", *args)
    printed = capsys.readouterr().out
    code = dict(re.findall(r"\nload with (\w+):\n(.*?)(?=\n\n|\Z)", printed, re.S))
    assert code, printed
    errors.progress.reset()
    return printed, code


def load(code):
    namespace = {}
    exec(code, namespace)
    return namespace["model"]


def medssl_features(ckpt, images):
    """The features evaluate.py computes: models.load_encoder from the checkpoint, models.features."""
    meta, _ = models.checkpoint_meta(ckpt)
    encoder = models.load_encoder(ckpt, meta["arch"], meta["stem"], meta["in_chans"], size=meta["size"])
    return models.features(encoder, images, meta["in_chans"])


def scaled(images, channels):
    """The model card's input scaling, written out: uint8 / 255, (x - 0.5) / 0.5, gray repeated."""
    x = (images.float() / 255 - 0.5) / 0.5
    return x.repeat(1, channels, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def check_loads(code, images, reference, channels, rtol=0.0):
    """Each library's model, built by its code, gives `reference` on the documented input. rtol: a folded
    conv1 sums w / 3 three times, exact but for float rounding (features of norm ~100 here)."""
    for library, source in code.items():
        got = load(source)(scaled(images, channels))
        err = (got - reference).abs().max().item()
        assert torch.allclose(got, reference, atol=1e-5, rtol=rtol), f"{library}: max |diff| {err}\n{source}"


@pytest.fixture
def images():
    return torch.randint(0, 256, (6, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_byol_run_resnet18_exports_to_timm_torchvision_and_hub(tmp_path, monkeypatch, capsys, images):
    """A real BYOL pretraining run (a ResNet-18, imagenet stem, 3 channels): each loading recipe
    reproduces the features; the file is a fraction of the checkpoint; the card holds the metrics."""
    run = tmp_path / "byol"
    run_main(monkeypatch, "pretrain_byol.py", "--data", "breastmnist", "--data-root", real_file_root(), "--epochs",
             "1", "--max-steps", "1", "--batch-size", "8", "--device", "cpu", "--out", run,
             "--projector-hidden", "32", "--predictor-hidden", "32", "--projector-out", "16", "--aug", "byol")
    errors.progress.reset()
    rundir._pending.clear()
    ckpt = str(run / "checkpoint.pt")
    values = {0: {"auc": 0.81234, "acc": 0.7, "threshold": 0.4}, 1: {"auc": 0.79871, "acc": 0.75, "threshold": 0.5},
              2: {"auc": 0.80502, "acc": 0.72, "threshold": 0.6}}
    evaluation = tmp_path / "probe"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({
        "data": "breastmnist", "mode": "linear_probe", "encoder": ckpt,
        "per_seed": [{"seed": s, "test": t} for s, t in values.items()]}))

    printed, code = export(monkeypatch, capsys, "--ckpt", ckpt, "--metrics", evaluation)
    out = run / "export"
    assert set(code) == {"timm", "torchvision", "hf"}
    assert code["torchvision"].count("\n") == 2  # the imports and two lines
    check_loads(code, images, medssl_features(ckpt, images), 3)
    card = (out / "hf" / "README.md").read_text()
    card_code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("<folder>", str(out / "hf"))
    check_loads({"card": card_code}, images, medssl_features(ckpt, images), 3)

    assert os.path.getsize(out / "encoder.safetensors") < 0.3 * os.path.getsize(ckpt)
    with safe_open(str(out / "encoder.safetensors"), "pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype in (torch.float32, torch.int64) for k in f.keys())
    assert meta["arch"] == "resnet18" and meta["in_chans"] == "3" and meta["method"] == "byol"
    assert meta["input_scaling"] == models.INPUT_SCALING and meta["stem"] == "imagenet"

    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and "byol" in front["tags"] and front["datasets"] == ["breastmnist"]
    auc = [values[s]["auc"] for s in values]
    row = next(line for line in card.splitlines() if line.startswith("| auc |"))
    assert row == ("| auc | " + " | ".join(f"{v:.4f}" for v in auc)
                   + f" | {np.mean(auc):.4f} ± {np.std(auc, ddof=1):.4f} |")
    assert "| threshold |" not in card and "linear_probe, 3 seeds" in card and "BYOL" in card
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["pretrained_cfg"]["mean"] == [0.5] * 3
    assert "origin_url" not in config["pretrained_cfg"]


def test_small_stem_one_channel_and_rgb_fold(tmp_path, monkeypatch, capsys, images):
    """A 1-channel small-stem ResNet: the printed recipes (with their stem line) give its features;
    --rgb folds conv1 to 3 channels, the same features on gray repeated to RGB."""
    ckpt = medssl_checkpoint(str(tmp_path / "small.pt"), "resnet18", "small", 1)
    reference = medssl_features(ckpt, images)
    _, code = export(monkeypatch, capsys, "--ckpt", ckpt, "--out", tmp_path / "gray")
    assert all("maxpool" in c for c in code.values())
    check_loads(code, images, reference, 1)

    _, code = export(monkeypatch, capsys, "--ckpt", ckpt, "--out", tmp_path / "rgb", "--rgb")
    check_loads(code, images, reference, 3, rtol=1e-5)
    with safe_open(str(tmp_path / "rgb" / "encoder.safetensors"), "pt") as f:
        assert f.get_tensor("conv1.weight").shape == (64, 3, 3, 3) and f.metadata()["folded_to_rgb"] == "true"

    # the imagenet stem at 1 channel, folded: torchvision's resnet18() as it is
    ckpt = medssl_checkpoint(str(tmp_path / "gray7.pt"), "resnet18", "imagenet", 1, seed=2)
    _, code = export(monkeypatch, capsys, "--ckpt", ckpt, "--out", tmp_path / "rgb7", "--rgb")
    assert "Conv2d" not in code["torchvision"] and "Conv2d" not in code["timm"]
    check_loads(code, images, medssl_features(ckpt, images), 3, rtol=1e-5)


def test_vit_tiny_patch4(tmp_path, monkeypatch, capsys, images):
    """A ViT-Tiny at 28 px in 4 px patches, as the platform builds it: timm and the hub folder."""
    ckpt = medssl_checkpoint(str(tmp_path / "vit.pt"), "vit_tiny_patch16_224", method="dino")
    _, code = export(monkeypatch, capsys, "--ckpt", ckpt)
    assert set(code) == {"timm", "hf"} and "patch_size=4" in code["timm"]
    check_loads(code, images, medssl_features(ckpt, images), 3)
    config = json.loads((tmp_path / "export" / "hf" / "config.json").read_text())
    assert config["model_args"]["patch_size"] == 4 and config["model_args"]["img_size"] == [28, 28]

    # a real MAE run (timm's test ViT, its position embedding frozen), exported twice into the same folder
    from common import methods
    run = tmp_path / "mae"
    run_main(monkeypatch, "pretrain_mae.py", "--data", "breastmnist", "--data-root", real_file_root(), "--epochs", "1",
             "--max-steps", "1", "--batch-size", "8", "--device", "cpu", "--out", run, *methods.get("mae").smoke_flags)
    errors.progress.reset()
    rundir._pending.clear()
    for _ in range(2):
        _, code = export(monkeypatch, capsys, "--ckpt", run / "checkpoint.pt")
    check_loads(code, images, medssl_features(str(run / "checkpoint.pt"), images), 3)
    assert sorted(os.listdir(run / "export" / "hf")) == ["README.md", "config.json", "model.safetensors"]


def one_line_error(monkeypatch, capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "export.py", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, fresh_state):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "foreign.pt")
    assert "not a MedSSL checkpoint" in one_line_error(monkeypatch, capsys, "--ckpt", tmp_path / "foreign.pt")
    ckpt = medssl_checkpoint(str(tmp_path / "ok.pt"), "resnet18")
    state = torch.load(ckpt, weights_only=True)
    del state["encoder"]
    torch.save(state, tmp_path / "headless.pt")
    assert "holds no encoder" in one_line_error(monkeypatch, capsys, "--ckpt", tmp_path / "headless.pt")
    state = torch.load(ckpt, weights_only=True)
    state["meta"]["stem"] = "small"  # the 7x7 conv1 its encoder holds is not what the meta names
    torch.save(state, tmp_path / "mislabelled.pt")
    err = one_line_error(monkeypatch, capsys, "--ckpt", tmp_path / "mislabelled.pt")
    assert "does not fit" in err and "conv1.weight is (64, 3, 7, 7), not (64, 3, 3, 3)" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = one_line_error(monkeypatch, capsys, "--ckpt", ckpt, "--out", tmp_path / "mine")
    assert "notes.txt" in err and os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "other.json").write_text("{}")
    assert "not an evaluate.py metrics.json" in one_line_error(monkeypatch, capsys, "--ckpt", ckpt, "--metrics",
                                                               tmp_path / "other.json")
    assert not (tmp_path / "export").exists()
    # as a user runs it: exit 2, one line, no traceback
    r = run_cli("export.py", "--ckpt", str(tmp_path / "headless.pt"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
