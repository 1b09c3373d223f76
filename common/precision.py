"""The arithmetic a step runs in: bf16 autocast or float32, the convolutions' memory layout, and on a
CPU whether the convolutions with tiny outputs run as matrix products (common/small_convs.py), chosen
once per run for its device, network and image side (--precision auto | fp32 | bf16).

Only autocast regions compute in bf16: weights, optimiser states, losses (each method's loss casts to
float32), EMA updates, BatchNorm statistics, metrics and checkpoints stay float32.

`auto` on a CPU for a convolutional network (a ResNet-18 forward + backward + SGD step on 2 cores with
AMX-BF16 and AVX512-BF16, 2 threads, torch 2.14.1, images/s; `python benchmarks/bench_precision.py`):

    side  batch  fp32 contiguous  fp32 channels_last  bf16 channels_last  + matmul tiny convs
    28    256    855              887                 772                 1047
    64    128    198              195                 330                 453
    128   64     54               62                  151                 (none that small)
    224   32     18               23                  64                  (none that small)

bf16 with channels_last pays from 64 px up; at 28 px it loses only because oneDNN's convolution kernels
are slow on 2x2 and 1x1 maps (layer3 and layer4 behind the imagenet stem), and with those convolutions
as matrix products it is the fastest at every side. Speed is not all, though: fine-tuning a random-init
ResNet-18 on 10% of BreastMNIST's labels at 28 px (evaluate.py's defaults, 5 seeds) scored test AUC
0.744 +- 0.020 in float32, 0.716 +- 0.031 in bf16 and 0.690 +- 0.039 in bf16 with the matrix products;
at 64 px 0.767 +- 0.014 in float32 and 0.767 +- 0.024 in bf16 with the matrix products. So `auto` takes bf16, channels_last and the matrix products where the CPU runs bf16 natively
(AVX512-BF16 or AMX) from BF16_MIN_SIDE up, and float32 below it. A CPU without native bf16 (it would
emulate it, several times slower) never gets bf16: float32, contiguous from BF16_MIN_SIDE up to
CHANNELS_LAST_MIN_SIDE (1.14x at 64 px), channels_last otherwise (at 28 px the layout float32 runs have
always had). `fp32` is float32 with channels_last at every side, the arithmetic of every result computed
before this setting existed, bit for bit; `bf16` on a CPU is bf16 with the matrix products at every side.
On CUDA: bf16 with channels_last where the GPU supports bf16, as the GPU check measures; never the
matrix products."""
from dataclasses import dataclass

import torch

from common import small_convs
from common.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
BF16_MIN_SIDE = 48           # between 28 px (bf16 costs fine-tuning accuracy) and 64 px (bf16 1.9x-2.6x faster)
CHANNELS_LAST_MIN_SIDE = 128  # float32 on the CPU: contiguous is faster below, down to BF16_MIN_SIDE
# A ViT follows the same rule, always contiguous: channels_last changes nothing for its one convolution
# (the patch embedding), and no convolution of it has a tiny output. Its bf16 gain is smaller than a
# ResNet's (vit_tiny_patch16_224 with the default patches, same machine, images/s, fp32 contiguous / bf16:
# 28 px, batch 256: 117 / 163; 64 px, batch 128: 95 / 112; `bench_precision.py --arch vit_tiny_patch16_224`).


@dataclass(frozen=True)
class Precision:
    """What a run computes in: `bf16` autocast on or off, the memory layout of images and weights, and
    whether the convolutions with tiny outputs run as matrix products (common/small_convs.py)."""
    bf16: bool
    channels_last: bool
    matmul_small_convs: bool = False

    @property
    def name(self):
        return "bf16" if self.bf16 else "fp32"

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def record(self):
        """The plain values a checkpoint's meta keeps, and `resolve` takes back on resume."""
        return {"precision": self.name, "channels_last": self.channels_last,
                "matmul_small_convs": self.matmul_small_convs}

    def describe(self):
        """'bf16, channels_last, tiny convolutions as matrix products' or 'fp32, contiguous': in words."""
        return f"{self.name}, {'channels_last' if self.channels_last else 'contiguous'}" + \
            (", tiny convolutions as matrix products" if self.matmul_small_convs else "")

    def prepare(self, module, device, in_chans, side):
        """`module` on `device` in this memory layout, its tiny convolutions (on `in_chans`-channel, `side`
        px images) as matrix products where this Precision has them. Returns the module."""
        module.to(device, memory_format=self.memory_format)
        if self.matmul_small_convs:
            small_convs.as_matmul(module, in_chans, side)
        return module

    def autocast(self, device_type):
        """The autocast context of a forward: bf16 where on, a no-op elsewhere."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)


def native_bf16(device):
    """Whether `device` runs bf16 arithmetic natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve(requested, device, side, recorded=None, convolutional=True):
    """The Precision of a run: `requested` (--precision), on `device`, for images of `side` px. A resumed run
    passes the `recorded` values of its checkpoint (Precision.record) and continues in them.
    convolutional=False: a ViT, whose one convolution (the patch embedding) gains nothing from
    channels_last: always contiguous."""
    if recorded:
        return Precision(recorded["precision"] == "bf16", bool(recorded["channels_last"]),
                         bool(recorded.get("matmul_small_convs", False)))
    if requested not in CHOICES:
        raise ValueError(f"unknown precision {requested!r}; expected one of {CHOICES}")
    device = torch.device(device)
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UserError("--precision bf16: this GPU does not support bf16; use --precision fp32 or auto")
    if device.type == "cuda":
        bf16 = requested == "bf16" or (requested == "auto" and native_bf16(device))
        return Precision(bf16, convolutional)
    if requested == "fp32":  # float32 as MedSSL has always computed it: its results reproduce bit for bit
        return Precision(False, convolutional)
    if requested == "bf16" or (native_bf16(device) and side >= BF16_MIN_SIDE):  # requested is bf16 or auto here
        return Precision(True, convolutional, matmul_small_convs=convolutional)
    return Precision(False, convolutional and not BF16_MIN_SIDE <= side < CHANNELS_LAST_MIN_SIDE)
