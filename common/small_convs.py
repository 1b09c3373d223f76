"""Convolutions with a tiny output (2x2 pixels or fewer) computed as one matrix product: unfold the
input into columns, multiply by the weight matrix. The module stays an nn.Conv2d with the same
parameters, so state dicts, optimisers and checkpoints see no difference.

Why: on the CPU, oneDNN's convolution kernels are slow when the feature map is tiny. In a ResNet-18 at
64 px (imagenet stem) layer4's maps are 2x2; its convolutions hold a quarter of the arithmetic and take
half of a bf16 step's time (the backward of one 512->512 3x3 convolution: 164 ms for 9.7 GFLOP, against
6 ms for the same arithmetic in layer1 at 16x16). The same arithmetic as a matrix product runs on the
AMX / AVX512 GEMM kernels. A ResNet-18 forward + backward + SGD step, bf16 autocast, channels_last,
2 cores with AMX-BF16, torch 2.14.1, images/s (conv / with this; benchmarks/bench_precision.py):

    28 px, batch 256 (layer3 at 2x2, layer4 at 1x1; 10 convolutions):  772 / 1047
    64 px, batch 128 (layer4 at 2x2; 5 convolutions):                  330 /  453

In float32 the matrix product is slower at 28 px (942 / 767) and no faster at 64 px contiguous, and
from 4x4 maps up the convolution wins (a 256->256 3x3 at 4x4: 51 ms / 111 ms), so common.precision
uses it only with bf16 on a CPU, for maps of at most MAX_OUTPUT_PIXELS. CUDA never uses it."""
import torch
import torch.nn.functional as F
from torch import nn

MAX_OUTPUT_PIXELS = 4  # 2x2


class MatmulConv2d(nn.Conv2d):
    """An nn.Conv2d (groups 1, no dilation, zero padding) whose forward is unfold + one matrix product.
    Set on an existing convolution by `as_matmul`, which swaps its class and keeps its parameters."""

    def _conv_forward(self, x, weight, bias):
        n, channels, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):  # a 1x1 projection (ResNet's downsample): no unfold
            columns = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(n * out_h * out_w, channels)
        else:  # (n, C*kh*kw, L) -> one row per output pixel
            columns = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw)).transpose(1, 2)
            columns = columns.reshape(n * out_h * out_w, -1)
        y = columns @ weight.reshape(weight.shape[0], -1).t()
        if bias is not None:
            y = y + bias
        return y.reshape(n, out_h, out_w, -1).permute(0, 3, 1, 2)  # laid out as channels_last


def _fits(conv):
    return conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and \
        isinstance(conv.padding, tuple)


def as_matmul(module, in_chans, side, max_output_pixels=MAX_OUTPUT_PIXELS):
    """Turn every convolution of `module` whose output on a `side` px, `in_chans`-channel input has at
    most `max_output_pixels` pixels into a MatmulConv2d, in place (found by one forward of a 1-image
    batch in eval mode; every submodule's training mode is put back). Returns their number."""
    if not any(type(m) is nn.Conv2d for m in module.modules()):  # a head: nothing to swap, no image input
        return 0
    output_pixels = {}
    hooks = [m.register_forward_hook(lambda m, _, out: output_pixels.__setitem__(m, out.shape[-2] * out.shape[-1]))
             for m in module.modules() if type(m) is nn.Conv2d and _fits(m)]
    training = {m: m.training for m in module.modules()}
    parameter = next(module.parameters())
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, in_chans, side, side, device=parameter.device, dtype=parameter.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in training.items():
            m.training = mode
    small = [m for m, pixels in output_pixels.items() if pixels <= max_output_pixels]
    for conv in small:
        conv.__class__ = MatmulConv2d
    return len(small)
