"""pretrain_mae.py: the masking (75% of each image's patches, its own draw), the target (each patch's pixels
normalised by its own mean and variance), the loss over the hidden patches alone, an encoder that never sees
the hidden patches, and a tiny run whose loss falls and whose encoder loads into timm as it is. Resume after
SIGKILL, the 2-process run and --compile: the tests over every method (tests/test_resume.py, test_ddp.py,
test_compile.py)."""
import json

import pytest
import timm
import torch

import pretrain_mae
from common import models, pretrain
from common.errors import UserError
from conftest import run_main

TINY = ["--arch", "test_vit", "--decoder-depth", "1", "--decoder-width", "32", "--decoder-heads", "2"]


def built(argv=(), batch=8, in_chans=1):
    """A tiny MAE (the smoke flags) built on random 28 px images: (Method, args, images)."""
    args = pretrain_mae.get_args_parser().parse_args([*pretrain_mae.SMOKE_FLAGS, "--batch-size", str(batch),
                                                      "--in-chans", str(in_chans), "--epochs", "1", *argv])
    images = torch.randint(0, 256, (4 * batch, in_chans, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return pretrain_mae.build(args, pretrain.in_memory(vars(args), images, "cpu")), args, images


def test_the_defaults_are_the_papers():
    """He et al. §4 (mask ratio 0.75), §3 / Table 1d (normalised pixels), Table 1a-b (decoder 8 x 512),
    Table 8 (AdamW, betas 0.9 / 0.95, weight decay 0.05, 1.5e-4 x 4096 / 256, 40 warm-up epochs of 800)."""
    args = pretrain_mae.get_args_parser().parse_args([])
    assert args.mask_ratio == 0.75 and args.norm_pix_loss is True
    assert (args.decoder_depth, args.decoder_width) == (8, 512)
    assert (args.optimizer, args.weight_decay, args.batch_size) == ("adamw", 0.05, 4096)
    assert args.lr == pytest.approx(1.5e-4 * 4096 / 256) and (args.warmup_epochs, args.epochs) == (40, 800)
    assert args.crop_scale == [0.2, 1.0] and pretrain_mae.BETAS == (0.9, 0.95)
    assert pretrain_mae.get_args_parser().parse_args(["--no-norm-pix-loss"]).norm_pix_loss is False


@pytest.mark.parametrize("n", [49, 196, 50])
def test_each_image_hides_round_three_quarters_of_its_patches_its_own_draw(n):
    noise = torch.rand(16, n, generator=torch.Generator().manual_seed(n))
    keep, mask = pretrain_mae.random_masking(noise, 0.75)
    hidden = round(0.75 * n)
    assert keep.shape == (16, n - hidden) and mask.dtype == noise.dtype
    assert mask.sum(dim=1).tolist() == [hidden] * 16                       # exactly, in every image
    assert (mask.gather(1, keep) == 0).all()                                # the kept ones are the visible ones
    # the hidden patches are each image's largest draws (He et al. §3: a uniform random subset per image)
    largest = noise.topk(hidden, dim=1).indices
    assert (mask.gather(1, largest) == 1).all()
    assert len({tuple(row.tolist()) for row in mask}) == 16                 # no two images share a mask


def test_the_target_is_each_patchs_pixels_normalised_by_their_own_mean_and_variance():
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    target = pretrain_mae.pixel_target(x, 4, norm_pix=True)
    raw = pretrain_mae.pixel_target(x, 4, norm_pix=False)
    assert target.dtype == torch.float32 and target.shape == (2, 49, 4 * 4 * 3)
    for b in range(2):
        for row in range(7):
            for col in range(7):
                patch = x[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].float().permute(1, 2, 0).flatten()
                expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()   # unbiased variance, as MAE's code
                torch.testing.assert_close(target[b, 7 * row + col], expected, rtol=1e-5, atol=1e-5)
                assert torch.equal(raw[b, 7 * row + col], patch)


def test_patches_are_cut_in_the_encoders_token_order():
    """Patch i of the target is the patch whose token is i: the patch embedding (a strided convolution) equals
    a linear map of patchify's rows."""
    encoder = models.build_encoder("test_vit", None, 3, size=28)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    conv = encoder.patch_embed.proj
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)                   # (D, p, p, C), as patchify's rows
    tokens = encoder.patch_embed(x).flatten(1, 2)                         # (B, h, w, D) under dynamic_img_size
    torch.testing.assert_close(pretrain_mae.patchify(x, 4) @ weight.T + conv.bias, tokens, rtol=1e-4, atol=1e-4)


def test_the_loss_is_the_mean_squared_error_over_the_hidden_patches_only():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(4, 49, 48, generator=g), torch.randn(4, 49, 48, generator=g)
    _, mask = pretrain_mae.random_masking(torch.rand(4, 49, generator=g), 0.75)
    loss = pretrain_mae.masked_mse(pred, target, mask)
    hidden = mask.bool()
    assert loss.item() == pytest.approx((pred[hidden] - target[hidden]).square().mean().item(), rel=1e-6)
    other = torch.where(hidden[..., None], pred, pred + 100.0)            # anything at the visible patches
    assert torch.equal(pretrain_mae.masked_mse(other, target, mask), loss)
    moved = pred.clone()
    moved[hidden.nonzero()[0].unbind()] += 1.0                           # one hidden patch
    assert pretrain_mae.masked_mse(moved, target, mask) > loss


def test_the_encoder_sees_the_visible_patches_only():
    method, _, _ = built()
    mae = pretrain_mae.MaskedAutoencoder(method.modules["encoder"], method.modules["decoder"])
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    keep, mask = pretrain_mae.random_masking(torch.rand(2, 49, generator=torch.Generator().manual_seed(4)), 0.75)
    pixels = mask.view(2, 1, 7, 1, 7, 1).expand(2, 1, 7, 4, 7, 4).reshape(2, 1, 28, 28).bool()
    with torch.no_grad():
        latent = mae.encode(x, keep)
        assert latent.shape == (2, 1 + 12, mae.encoder.embed_dim)        # the class token, 12 visible patches
        assert torch.equal(mae.encode(torch.where(pixels, -x, x), keep), latent)   # hidden pixels changed
        assert not torch.allclose(mae.encode(torch.where(pixels, x, -x), keep), latent)   # visible ones
        assert mae(x, keep).shape == (2, 49, 16)                          # the decoder predicts every patch


def test_the_encoders_position_embedding_is_fixed_sine_cosine_and_biases_have_no_weight_decay():
    method, _, images = built()
    encoder = method.modules["encoder"]
    assert not encoder.pos_embed.requires_grad
    sincos = pretrain_mae.sincos_pos_embed((7, 7), encoder.embed_dim, 1)
    assert torch.equal(encoder.pos_embed.detach(), sincos) and sincos[0, 0].abs().sum() == 0
    decay, no_decay = method.optimizer.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(p.ndim <= 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)
    method.step(images[:8], 0)
    assert torch.equal(encoder.pos_embed.detach(), sincos)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_other_optimizers_take_the_parameters_too(optimizer):
    method, _, images = built(["--optimizer", optimizer, "--lr", "0.01"])
    loss, _ = method.step(images[:8], 0)
    assert torch.isfinite(loss) and sum(len(g["params"]) for g in method.optimizer.param_groups) == sum(
        p.requires_grad for m in method.modules.values() for p in m.parameters())


def test_a_tiny_run_lowers_the_loss_and_saves_an_encoder_timm_loads_strictly(real_root, tmp_path, monkeypatch):
    run_main(monkeypatch, "pretrain_mae.py", "--data", "breastmnist", "--data-root", real_root, *TINY,
             "--epochs", "3", "--max-steps", "3", "--batch-size", "16", "--lr", "1e-3", "--lr-schedule", "constant",
             "--warmup-epochs", "0", "--device", "cpu", "--out", tmp_path)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl")]
    assert losses[2] < 0.85 * losses[0], losses
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["meta"]["method"] == "mae" and checkpoint["meta"]["patch_size"] == 4
    reference = timm.create_model("test_vit", num_classes=0, in_chans=3, img_size=28, patch_size=4)
    reference.load_state_dict(checkpoint["encoder"], strict=True)
    loaded = models.load_encoder(str(tmp_path / "checkpoint.pt"), "test_vit", None, 3, size=28)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("flags, needle", [
    (["--arch", "resnet18"], "is not a timm VisionTransformer"),
    (["--decoder-width", "30", "--decoder-heads", "4"], "--decoder-heads 4 must divide --decoder-width 30"),
    (["--mask-ratio", "0.995"], "hides 49 of the 49 patches"),
    (["--patch-size", "5"], "--patch-size 5"),
])
def test_what_mae_cannot_train_is_one_line_before_anything_is_written(flags, needle, tmp_path):
    args = pretrain_mae.get_args_parser().parse_args([*TINY, *flags, "--out", str(tmp_path / "run")])
    with pytest.raises(UserError) as e:
        pretrain_mae.check(args)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
