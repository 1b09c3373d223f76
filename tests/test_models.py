import pytest
import torch
import torchvision

from common import models, rundir
from common.errors import UserError


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_encoder_state_dict_loads_strictly_into_torchvision_except_fc(arch):
    encoder = models.build_encoder(arch, "imagenet", 3)
    reference = getattr(torchvision.models, arch)()
    missing, unexpected = reference.load_state_dict(encoder.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert encoder(torch.zeros(2, 3, 28, 28)).shape == (2, models.FEATURE_DIM[arch])


def test_small_stem_and_one_channel():
    encoder = models.build_encoder("resnet18", "small", 1)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, torch.nn.Identity) and encoder.conv1.in_channels == 1
    assert encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 512)
    assert models.build_encoder("resnet18", "imagenet", 1).conv1.kernel_size == (7, 7)


def test_init_from_a_local_pth_works_like_imagenet_weights(tmp_path):
    # an offline user's torchvision-layout .pth, fc included, as torchvision's weights API gives it
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    encoder = models.load_encoder(str(tmp_path / "resnet18.pth"), "resnet18", "imagenet", 3)
    assert torch.equal(encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # gray input: conv1 summed over RGB, so a gray image gives the features of its RGB copy
    gray = models.load_encoder(str(tmp_path / "resnet18.pth"), "resnet18", "imagenet", 1).eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(gray(x), encoder.eval()(x.expand(-1, 3, -1, -1)), atol=1e-5)
    # small stem: conv1 cannot be reused, everything else is
    small = models.load_encoder(str(tmp_path / "resnet18.pth"), "resnet18", "small", 3)
    assert torch.equal(small.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_imagenet_init_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        models.load_encoder("imagenet", "resnet18")
    assert "--init /path/to/resnet18-" in str(e.value) and "\n" not in str(e.value)


def _checkpoint(tmp_path, **meta):
    meta = {"format": "medssl", "arch": "resnet18", "stem": "imagenet", "in_chans": 3, **meta}
    encoder = models.build_encoder(meta["arch"], meta["stem"], meta["in_chans"])
    path = str(tmp_path / "checkpoint.pt")
    rundir.save_checkpoint({"encoder": encoder.state_dict(), "meta": meta}, path)
    return path, encoder


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path, saved = _checkpoint(tmp_path, stem="small")
    loaded = models.load_encoder(path, "resnet18", "small", 3)
    assert torch.equal(loaded.conv1.weight, saved.conv1.weight)
    with pytest.raises(UserError, match="small stem"):
        models.load_encoder(path, "resnet18", "imagenet", 3)
    with pytest.raises(UserError, match="in_chans 1"):
        models.load_encoder(path, "resnet18", "small", 1)


def test_foreign_or_malicious_files_are_refused(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a MedSSL checkpoint nor a ResNet"):
        models.load_encoder(str(tmp_path / "other.pt"))

    class Payload:  # unpickling this would run code; weights_only loading must refuse it
        def __reduce__(self):
            return (print, ("executed",))
    torch.save({"encoder": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        models.load_encoder(str(tmp_path / "evil.pt"))


def test_mlp_is_linear_bn_relu_linear():
    head = models.mlp(512, 4096, 256)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head(torch.zeros(4, 512)).shape == (4, 256)


def test_features_are_in_eval_mode_and_restore_training_mode():
    encoder = models.build_encoder().train()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    f = models.features(encoder, images, in_chans=3, batch_size=4)
    assert f.shape == (6, 512) and encoder.training
    # eval mode: a batch's features do not depend on what else is in the batch
    assert torch.allclose(models.features(encoder, images[:1], in_chans=3), f[:1], atol=1e-5)


def test_check_meta_takes_any_timm_model_and_reads_a_checkpoint_without_vit_keys(tmp_path):
    meta = {"format": "medssl", "arch": "vit_tiny_patch16_224", "stem": "imagenet", "in_chans": 1, "patch_size": 4,
            "pool": "mean"}
    models.check_meta(meta, "x.pt", "vit_tiny_patch16_224", None, 1, 4, "mean")
    with pytest.raises(UserError, match="neither resnet18 / resnet50 nor a timm model"):
        models.check_meta({**meta, "arch": "vit_tiniest"}, "x.pt", None, None, None)
    with pytest.raises(UserError, match="not the patch_size 8 asked for"):
        models.check_meta(meta, "x.pt", None, None, None, patch_size=8)
    path, saved = _checkpoint(tmp_path)  # a ResNet checkpoint: no size, patch_size or pool in its meta
    loaded = models.load_encoder(path, "resnet18", "imagenet", 3, size=64)
    assert torch.equal(loaded.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)
