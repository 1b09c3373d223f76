"""Tests for common/saliency.py on hand-built networks whose evidence is known to be in one place."""
import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from common import models, saliency

SIDE = 16
QUADRANTS = {"top-left": (slice(0, 8), slice(0, 8)), "top-right": (slice(0, 8), slice(8, 16)),
             "bottom-left": (slice(8, 16), slice(0, 8)), "bottom-right": (slice(8, 16), slice(8, 16))}


class ChannelMask(nn.Module):
    """Multiplies channel c of the feature map by a fixed 0/1 spatial mask[c]."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def quadrant_net(region_of_class):
    """Class c's logit is the mean of channel c of a 2 x 2, stride-2 conv (receptive fields tile the
    image exactly), masked to region_of_class[c]: nothing outside that quadrant can change it. The
    masked map (8 x 8) is the Grad-CAM layer, so the map must also be upsampled the right way round
    to land on the 16 x 16 input."""
    k = len(region_of_class)
    conv = nn.Conv2d(1, k, 2, stride=2, bias=False)
    nn.init.constant_(conv.weight, 1 / 4)
    mask = torch.zeros(k, SIDE // 2, SIDE // 2)
    for c, name in enumerate(region_of_class):
        rows, cols = QUADRANTS[name]
        mask[c, rows.start // 2:rows.stop // 2, cols.start // 2:cols.stop // 2] = 1
    head = nn.Linear(k, k, bias=False)
    nn.init.eye_(head.weight)
    return nn.Sequential(conv, nn.ReLU(), ChannelMask(mask), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def blob_net():
    """Logit 1 = mean response of a 5 x 5 box filter thresholded at 0.5: only a bright blob passes,
    so the evidence sits wherever the blob is in each image (logit 0 is its negative)."""
    conv = nn.Conv2d(1, 1, 5, padding=2)
    nn.init.constant_(conv.weight, 1 / 25)
    nn.init.constant_(conv.bias, -0.5)
    head = nn.Linear(1, 2, bias=False)
    head.weight.data = torch.tensor([[-1.0], [1.0]])
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def blob_images(centres, seed=0):
    """Dim noise (< 0.2) with a bright 5 x 5 blob centred at each (row, col)."""
    x = 0.2 * torch.rand(len(centres), 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    for i, (r, c) in enumerate(centres):
        x[i, 0, r - 2:r + 3, c - 2:c + 3] = 1.0
    return x


def mass_in(maps, name):
    rows, cols = QUADRANTS[name]
    return (maps[:, rows, cols].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))).tolist()


@pytest.mark.parametrize("regions", [("top-left", "bottom-right"), ("bottom-left", "top-right")])
def test_gradcam_and_occlusion_follow_the_quadrant_each_class_reads(regions):
    net = quadrant_net(regions)
    images = torch.rand(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) + 0.1
    for c, name in enumerate(regions):
        for maps in (saliency.gradcam(net, net[2], images, class_idx=c),
                     saliency.occlusion_sensitivity(net, images, class_idx=c, patch=2, stride=2)):
            assert maps.shape == (3, SIDE, SIDE)
            assert maps.min() >= 0 and torch.allclose(maps.flatten(1).amax(1), torch.ones(3))
            # bilinear upsampling spills a little over the quadrant's border
            assert min(mass_in(maps, name)) > 0.85, (name, mass_in(maps, name))
            other = regions[1 - c]
            assert max(mass_in(maps, other)) < 0.05


def test_maps_peak_on_the_blob_that_drives_the_logit_and_move_with_it():
    centres = [(3, 3), (3, 12), (12, 4), (11, 11)]
    images, net = blob_images(centres), blob_net()
    for maps in (saliency.gradcam(net, net[0], images, class_idx=1),
                 saliency.occlusion_sensitivity(net, images, class_idx=1, patch=3, stride=1)):
        for i, (r, c) in enumerate(centres):
            peak_r, peak_c = divmod(int(maps[i].argmax()), SIDE)
            assert abs(peak_r - r) <= 2 and abs(peak_c - c) <= 2, (i, (peak_r, peak_c), (r, c))
        # the blobs lie one per quadrant, in QUADRANTS' order
        assert all(mass_in(maps[i:i + 1], q)[0] > 0.9 for i, q in enumerate(QUADRANTS))


def test_class_none_uses_the_predicted_class():
    net = blob_net()
    images = torch.cat([blob_images([(8, 8)]), torch.zeros(1, 1, SIDE, SIDE)])  # blob -> class 1, empty -> 0
    assert net(images).argmax(1).tolist() == [1, 0]
    maps = saliency.gradcam(net, net[0], images, class_idx=None)
    # class 1 on the blob image has evidence; class 0 on an empty image has none, and stays all zero
    assert maps[0].max() == 1 and maps[1].max() == 0


def test_maps_of_the_project_resnet_leave_each_module_in_its_mode():
    torch.manual_seed(0)
    encoder = models.build_encoder("resnet18", "small", in_chans=1)
    net = nn.Sequential(encoder, nn.Linear(models.FEATURE_DIM["resnet18"], 2)).train()
    encoder.bn1.eval()  # as a fine-tuning loop keeps the BatchNorm of frozen stages
    images = torch.randn(2, 1, 28, 28)
    maps = saliency.gradcam(net, encoder.layer4, images, class_idx=[0, 1])
    occl = saliency.occlusion_sensitivity(net, images, class_idx=[0, 1], patch=14, stride=14)
    assert maps.shape == occl.shape == (2, 28, 28)
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1 and 0 <= float(occl.min()) and float(occl.max()) <= 1
    assert not encoder.bn1.training and all(m.training for m in net.modules() if m is not encoder.bn1)
    assert net[1].weight.grad is None  # attribution gradients do not leak into the parameters


@pytest.mark.parametrize("stem, side, stage", [("imagenet", 28, "layer2"), ("small", 28, "layer4"),
                                               ("imagenet", 128, "layer4")])
def test_deepest_spatial_stage_skips_maps_too_small_to_locate_anything(stem, side, stage):
    encoder = models.build_encoder("resnet18", stem, in_chans=1).train()
    assert saliency.deepest_spatial_stage(encoder, torch.randn(2, 1, side, side)) == stage
    assert encoder.training


def test_overlay_grid_has_a_row_per_image_and_a_column_per_model(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    maps = {"pretrained": np.random.rand(3, 28, 28), "random init": np.zeros((3, 28, 28))}
    three = matplotlib.image.imread(saliency.plot_overlay_grid(gray, maps, str(tmp_path / "a.png"), title="t"))
    rgb = torch.rand(2, 3, 28, 28)  # channels-first colour tensors, as the models take them
    two = saliency.plot_overlay_grid(rgb, {"a": maps["pretrained"][:2]}, str(tmp_path / "b.png"))
    two = matplotlib.image.imread(two)
    assert three.shape[0] > two.shape[0] and three.shape[1] > two.shape[1]  # 3 x 3 panels vs 2 x 2
    with pytest.raises(ValueError, match="random init"):
        saliency.plot_overlay_grid(gray, {"random init": np.zeros((2, 28, 28))}, str(tmp_path / "c.png"))


def test_overlay_grid_labels_true_and_predicted_classes_and_checks_their_count(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    maps = {"pretrained": np.random.rand(2, 28, 28)}
    plain = matplotlib.image.imread(saliency.plot_overlay_grid(gray, maps, str(tmp_path / "a.png")))
    labelled = matplotlib.image.imread(saliency.plot_overlay_grid(
        gray, maps, str(tmp_path / "b.png"), row_labels=["normal", "pneumonia"],
        predicted={"pretrained": ["normal", "normal"]}))
    assert labelled.shape[0] > plain.shape[0]  # the label lines under each row take room
    with pytest.raises(ValueError, match="row_labels has 1 entries for 2 images"):
        saliency.plot_overlay_grid(gray, maps, str(tmp_path / "c.png"), row_labels=["normal"])
    with pytest.raises(ValueError, match="predicted"):
        saliency.plot_overlay_grid(gray, maps, str(tmp_path / "d.png"), predicted={"pretrained": ["x"]})
