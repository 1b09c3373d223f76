"""common/small_convs.py: a convolution computed as unfold + matrix product gives the convolution's
outputs and gradients, and swapping a network's tiny convolutions changes nothing a state dict sees."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common import small_convs


@pytest.mark.parametrize("c_in,c_out,side,kernel,stride,padding,bias", [
    (8, 16, 2, 3, 1, 1, False),   # layer4's 3x3 at 2x2
    (8, 16, 4, 3, 2, 1, False),   # its first, strided
    (8, 16, 4, 1, 2, 0, False),   # the 1x1 downsample
    (3, 5, 3, 3, 1, 0, True),     # a bias, no padding: 1x1 out
    (4, 6, 5, 2, 2, 1, True),     # an even kernel
])
def test_matmul_conv_equals_the_convolution(c_in, c_out, side, kernel, stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias).double()
    other = copy.deepcopy(conv)
    other.__class__ = small_convs.MatmulConv2d
    x = torch.randn(3, c_in, side, side, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    y1, y2 = conv(x1), other(x2)
    assert y1.shape == y2.shape
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other.weight.grad, conv.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(other.bias.grad, conv.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side,expected", [(28, 10), (64, 5), (128, 0)])
def test_as_matmul_swaps_the_tiny_convolutions_of_a_resnet(side, expected):
    """At 64 px layer4's maps are 2x2 (its four 3x3 convolutions and the downsample); at 28 px layer3's
    too (2x2) and layer4's (1x1); at 128 px none is that small."""
    torch.manual_seed(0)
    encoder = torchvision.models.resnet18()
    encoder.fc = nn.Identity()
    reference = copy.deepcopy(encoder)
    keys = list(encoder.state_dict())
    encoder.layer1.eval()  # a frozen part's mode, which the swap's forward must not change
    assert small_convs.as_matmul(encoder, 3, side) == expected
    swapped = [name for name, m in encoder.named_modules() if isinstance(m, small_convs.MatmulConv2d)]
    assert len(swapped) == expected and all(name.startswith(("layer3", "layer4")) for name in swapped)
    assert encoder.training and not encoder.layer1.training and encoder.layer2.training
    assert list(encoder.state_dict()) == keys
    # the same network: its outputs in float64, and its state dict loads into torchvision's resnet18
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    encoder.double().eval(), reference.double().eval()
    torch.testing.assert_close(encoder(x), reference(x), rtol=1e-10, atol=1e-10)
    torchvision.models.resnet18().load_state_dict({**encoder.state_dict(), **{
        k: v for k, v in torchvision.models.resnet18().state_dict().items() if k.startswith("fc.")}})


def test_as_matmul_leaves_a_network_without_tiny_maps_alone():
    """The small stem keeps 28 px maps large (layer4 at 4x4): nothing to swap, nothing changed."""
    from common import models
    encoder = models.build_encoder("resnet18", "small", 1)
    assert small_convs.as_matmul(encoder, 1, 28) == 0
    assert not any(isinstance(m, small_convs.MatmulConv2d) for m in encoder.modules())


def test_matmul_conv_in_bf16_autocast_tracks_the_convolution():
    """Under bf16 autocast both compute in bf16: they agree to bf16's resolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    other = copy.deepcopy(conv)
    other.__class__ = small_convs.MatmulConv2d
    x = torch.randn(16, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = conv(x).float(), other(x).float()
    exact = F.conv2d(x.double(), conv.weight.double(), padding=1)
    assert (y2 - exact).abs().max() <= 2 * (y1 - exact).abs().max() + 1e-3
