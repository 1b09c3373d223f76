"""timm backbones: ViTs of each size built for the data's side, their state dicts in timm's layout, timm
files as --init, convnets and the sides they refuse, layer-wise lr decay, and evaluate.py in every mode
on a ViT."""
import json
import os

import pytest
import timm
import torch

import evaluate
from common import models, optim, rundir
from common.errors import UserError
from conftest import run_main

TINY = "vit_tiny_patch16_224"


@pytest.mark.parametrize("arch, width", [(TINY, 192), ("vit_small_patch16_224", 384), ("vit_base_patch16_224", 768)])
@pytest.mark.parametrize("size, in_chans, patch", [(28, 1, 4), (64, 3, 8)])
def test_a_vit_of_each_size_is_built_for_the_side_and_channels(arch, width, size, in_chans, patch):
    torch.manual_seed(0)
    encoder = models.build_encoder(arch, "imagenet", in_chans, size=size)
    assert models.is_vit(encoder) and models.feature_dim(encoder) == width
    assert encoder.patch_embed.patch_size == (patch, patch) and encoder.patch_embed.proj.in_channels == in_chans
    assert encoder.pos_embed.shape[1] == 1 + (size // patch) ** 2  # the class token and a grid of the side
    if arch != "vit_base_patch16_224":  # ViT-B: built only, its forward costs seconds here
        assert encoder(torch.zeros(2, in_chans, size, size)).shape == (2, width)


def test_a_vit_base_takes_a_pretraining_step():
    """ViT-Base under SimCLR at 28 px (patch 4): one step of 4 images moves every block's weights and gives a
    finite loss (tests/test_resume.py resumes the tiny and small ones bit-exactly)."""
    import pretrain_simclr
    from common import pretrain
    args = pretrain_simclr.get_args_parser().parse_args(
        ["--arch", "vit_base_patch16_224", "--in-chans", "1", "--batch-size", "4", "--epochs", "1", "--aug", "base",
         "--projector-hidden", "16", "--projector-out", "8", "--precision", "fp32"])
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    run = pretrain.in_memory(vars(args), images, "cpu")
    method = pretrain_simclr.build(args, run)
    encoder = method.modules["encoder"]
    assert models.feature_dim(encoder) == 768 and encoder.patch_embed.patch_size == (4, 4)
    before = [block.mlp.fc1.weight.clone() for block in encoder.blocks]
    loss, _ = method.step(images, 0)
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, block.mlp.fc1.weight) for b, block in zip(before, encoder.blocks))


@pytest.mark.parametrize("pool, global_pool", [("cls", "token"), ("mean", "avg")])
def test_the_encoder_state_dict_loads_strictly_into_timm_and_gives_the_same_features(pool, global_pool):
    torch.manual_seed(0)
    encoder = models.build_encoder(TINY, "imagenet", 1, size=28, pool=pool).eval()
    reference = timm.create_model(TINY, num_classes=0, in_chans=1, img_size=28, patch_size=4,
                                  global_pool=global_pool).eval()
    reference.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(encoder(x), reference(x))
    # another side than built for: the position embedding is interpolated (DINO's local crops)
    assert encoder(torch.randn(2, 1, 16, 16)).shape == (2, 192)


def test_a_timm_file_initialises_the_encoder_fitted_to_gray_input(tmp_path):
    # an offline user's timm-layout weights, classifier included: as timm.create_model(...).state_dict() gives them
    torch.manual_seed(0)
    reference = timm.create_model(TINY, num_classes=10, img_size=28, patch_size=4).eval()
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    from safetensors.torch import save_file
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    x = torch.rand(2, 3, 28, 28)
    for name in ("vit.pth", "vit.safetensors"):
        encoder = models.load_encoder(str(tmp_path / name), TINY, "imagenet", 3, size=28).eval()
        assert torch.equal(encoder(x), reference.forward_head(reference.forward_features(x), pre_logits=True))
    # gray input: the patch embedding summed over RGB, so a gray image gives the features of its RGB copy
    gray = models.load_encoder(str(tmp_path / "vit.pth"), TINY, "imagenet", 1, size=28).eval()
    g = torch.rand(2, 1, 28, 28)
    assert torch.allclose(gray(g), encoder(g.expand(-1, 3, -1, -1)), atol=1e-4)
    # 224 px weights with 16 px patches into a 64 px ViT with 8 px patches: resampled by timm, blocks kept
    big = timm.create_model(TINY, num_classes=0)
    torch.save(big.state_dict(), tmp_path / "vit224.pth")
    small = models.load_encoder(str(tmp_path / "vit224.pth"), TINY, "imagenet", 3, size=64)
    assert small.pos_embed.shape[1] == 1 + 8 * 8 and torch.equal(small.blocks[5].mlp.fc1.weight,
                                                                 big.blocks[5].mlp.fc1.weight)


def _vit_checkpoint(path, **meta):
    torch.manual_seed(0)
    encoder = models.build_encoder(TINY, "imagenet", 1, size=28, patch_size=4, pool="mean")
    meta = {"format": "medssl", "arch": TINY, "stem": "imagenet", "in_chans": 1, "size": 28, "patch_size": 4,
            "pool": "mean", "args": {"size": 28, "epochs": 1}, **meta}
    rundir.save_checkpoint({"encoder": encoder.state_dict(), "meta": meta, "epoch": 1}, str(path))
    return encoder


def test_a_vit_checkpoint_brings_its_patch_size_and_pooling(tmp_path):
    saved = _vit_checkpoint(tmp_path / "checkpoint.pt")
    loaded = models.load_encoder(str(tmp_path / "checkpoint.pt"), TINY, "imagenet", 1, size=28)
    assert loaded.global_pool == "avg" and loaded.patch_embed.patch_size == (4, 4)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), saved.eval()(x))
    with pytest.raises(UserError, match="not the pool cls asked for") as e:
        models.load_encoder(str(tmp_path / "checkpoint.pt"), TINY, "imagenet", 1, size=28, pool="cls")
    assert "--pool" in str(e.value) and "\n" not in str(e.value)


def test_a_convnet_builds_and_a_side_it_cannot_take_is_one_line():
    encoder = models.build_encoder("convnext_atto", "imagenet", 1, size=64)
    assert not models.is_vit(encoder) and encoder(torch.zeros(2, 1, 64, 64)).shape == (2, models.feature_dim(encoder))
    with pytest.raises(UserError) as e:
        models.build_encoder("convnext_atto", "imagenet", 1, size=28)
    assert "--size" in str(e.value) and "ViT" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="configures a ViT"):
        models.build_encoder("resnet18", patch_size=4)


def test_layer_decay_gives_block_i_lr_times_decay_to_the_depth_minus_i():
    torch.manual_seed(0)
    encoder = models.build_encoder(TINY, "imagenet", 1, size=28)
    model = torch.nn.Sequential(encoder, torch.nn.Linear(192, 2))
    layer_of, n_layers = models.layer_ids(encoder)
    lr, decay, depth = 1e-3, 0.75, len(encoder.blocks)
    groups = optim.layer_decay_groups(model.named_parameters(), lambda n: layer_of(n.removeprefix("0.")), n_layers,
                                      lr, decay, 0.05)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(groups) == depth + 2 and all(g["lr"] == pytest.approx(lr * g["lr_scale"]) for g in groups)
    for i, block in enumerate(encoder.blocks):  # BEiT / MAE: block i (from 1) of L at lr x decay^(L - i + 1)
        assert all(lr_of[id(p)] == pytest.approx(lr * decay ** (depth - i)) for p in block.parameters())
    assert lr_of[id(encoder.patch_embed.proj.weight)] == pytest.approx(lr * decay ** (depth + 1))
    assert lr_of[id(encoder.cls_token)] == lr_of[id(encoder.pos_embed)] == lr_of[id(encoder.patch_embed.proj.weight)]
    assert lr_of[id(model[1].weight)] == lr_of[id(encoder.norm.weight)] == pytest.approx(lr)
    # the schedule keeps the ratios: every group at its lr_scale x the step's lr
    optimizer = torch.optim.Adam(groups, lr=lr)
    optim.schedule_step(optimizer, "cosine", 5, 10, lr)
    assert all(g["lr"] == pytest.approx(lr / 2 * g["lr_scale"]) for g in optimizer.param_groups)


@pytest.mark.parametrize("mode, init", [("linear_probe", "ckpt"), ("knn", "pth"), ("fewshot", "ckpt"),
                                        ("finetune", "random")])
def test_evaluate_runs_every_mode_on_a_vit(real_root, tmp_path, monkeypatch, mode, init):
    encoder = _vit_checkpoint(tmp_path / "checkpoint.pt")
    torch.save(encoder.state_dict(), tmp_path / "vit.pth")
    source = {"ckpt": ["--ckpt", tmp_path / "checkpoint.pt"],
              "pth": ["--init", tmp_path / "vit.pth", "--arch", TINY, "--in-chans", "1", "--pool", "mean"],
              "random": ["--init", "random", "--arch", TINY, "--layer-decay", "0.75"]}[init]
    # few images: a ViT forward of BreastMNIST's 546 training images alone takes seconds on a busy CPU
    train = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8"] if mode in ("finetune", "fewshot") else []
    train += ["--shots", "4"] if mode == "fewshot" else ["--label-fraction", "0.1"]
    out = tmp_path / "eval"
    run_main(monkeypatch, "evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", mode,
             *source, *train, "--out", out)
    metrics = json.load(open(out / "metrics.json"))
    pool = "cls" if init == "random" else "mean"
    assert metrics["backbone"] == {"arch": TINY, "stem": "imagenet", "in_chans": 3 if init == "random" else 1,
                                   "patch_size": 4, "pool": pool}
    assert 0 <= metrics["mean"]["auc"] <= 1 and metrics["precision"]["channels_last"] is False
    if init == "ckpt":
        assert metrics["pretraining"]["patch_size"] == 4 and metrics["pretraining"]["pool"] == "mean"


@pytest.mark.parametrize("flags, needle", [
    (["--arch", "vit_tiny"], "timm.list_models"),
    (["--arch", TINY, "--patch-size", "5"], "--patch-size 5 does not divide"),
    (["--arch", TINY, "--patch-size", "0"], "--patch-size must be positive"),
    (["--arch", "resnet18", "--pool", "cls"], "drop --pool"),
])
def test_bad_arch_or_patch_size_is_one_line_and_exit_2(real_root, tmp_path, monkeypatch, capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "knn",
                 *flags, "--out", tmp_path / "eval")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and "\n" not in err
    assert not os.path.exists(tmp_path / "eval")


def test_timm_imagenet_weights_offline_are_a_one_line_error_naming_the_file(monkeypatch):
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    with pytest.raises(UserError) as e:
        models.load_encoder("imagenet", TINY, "imagenet", 1, size=28)
    assert "hf download timm/vit_tiny_patch16_224" in str(e.value) and "--init /path/to/model.safetensors" in str(
        e.value) and "\n" not in str(e.value)
