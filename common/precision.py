"""The arithmetic a step runs in: bf16 autocast or float32, and the convolutions' memory layout, chosen
once per run for its device and image side (--precision auto | fp32 | bf16).

Only autocast regions compute in bf16: weights, optimiser states, losses (each method's loss casts to
float32), EMA updates, BatchNorm statistics, metrics and checkpoints stay float32.

`auto` on a CPU (a ResNet-18 forward + backward + SGD step on 2 cores with AMX-BF16 and AVX512-BF16,
torch 2.14.1, images/s):

    side  batch  fp32 contiguous  fp32 channels_last  bf16 contiguous  bf16 channels_last
    28    256    863              841                 724              778
    64    128    211              185                 282              352
    128   64     61               62                  90               144
    224   32     20               23                  47               67

bf16 pays from 64 px up and loses at 28 px, where the convolutions are too small for its kernels; with
bf16 channels_last is faster at every side. In float32 contiguous is faster at 64 px (1.14x), the two
tie at 28 px and channels_last wins from 128 px. So `auto` takes bf16 with channels_last where the CPU runs
bf16 natively (AVX512-BF16 or AMX) and the side is at least BF16_MIN_SIDE, and float32 elsewhere:
contiguous from BF16_MIN_SIDE up to CHANNELS_LAST_MIN_SIDE, channels_last otherwise (at 28 px the layout
float32 runs have always had, so their results stand). A CPU without native bf16 (it would emulate it,
several times slower) never gets it. `fp32` is float32 with channels_last at every side, the arithmetic of
every result computed before this setting existed, bit for bit. On CUDA: bf16 with channels_last where the GPU
supports bf16, as the GPU check measures."""
from dataclasses import dataclass

import torch

from common.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
BF16_MIN_SIDE = 48           # between 28 px (bf16 0.9x of fp32) and 64 px (1.7x)
CHANNELS_LAST_MIN_SIDE = 128  # float32 on the CPU: contiguous is faster below, down to BF16_MIN_SIDE


@dataclass(frozen=True)
class Precision:
    """What a run computes in: `bf16` autocast on or off, and the memory layout of images and weights."""
    bf16: bool
    channels_last: bool

    @property
    def name(self):
        return "bf16" if self.bf16 else "fp32"

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def record(self):
        """The plain values a checkpoint's meta keeps, and `resolve` takes back on resume."""
        return {"precision": self.name, "channels_last": self.channels_last}

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


def resolve(requested, device, side, recorded=None):
    """The Precision of a run: `requested` (--precision), on `device`, for images of `side` px. A resumed run
    passes the `recorded` values of its checkpoint (Precision.record) and continues in them."""
    if recorded:
        return Precision(recorded["precision"] == "bf16", bool(recorded["channels_last"]))
    if requested not in CHOICES:
        raise ValueError(f"unknown precision {requested!r}; expected one of {CHOICES}")
    device = torch.device(device)
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UserError("--precision bf16: this GPU does not support bf16; use --precision fp32 or auto")
    if device.type == "cuda":
        bf16 = requested == "bf16" or (requested == "auto" and native_bf16(device))
        return Precision(bf16, True)
    if requested == "fp32":  # float32 as MedSSL has always computed it: its results reproduce bit for bit
        return Precision(False, True)
    if requested == "bf16" or (native_bf16(device) and side >= BF16_MIN_SIDE):
        return Precision(True, True)
    return Precision(False, not BF16_MIN_SIDE <= side < CHANNELS_LAST_MIN_SIDE)
