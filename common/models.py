"""torchvision ResNet backbones without `fc`, their initialisation, and the MLP heads of BYOL.

The encoder keeps torchvision's module names, so its state dict loads into
`torchvision.models.resnet18()` (or 50) with only `fc` missing."""
import contextlib
import functools
import os

import torch
import torchvision
from torch import nn

from common.errors import UserError, escape

from common.rundir import load_checkpoint

FEATURE_DIM = {"resnet18": 512, "resnet50": 2048}
STEMS = ("imagenet", "small")
# The checkpoint layout this code writes and reads; a higher number was written by a newer MedSSL.
FORMAT_VERSION = 1
# How pixels reach the encoder (common.data.to_input), recorded in every checkpoint so that an
# evaluation can check it feeds the encoder what it was trained on.
INPUT_SCALING = "uint8 / 255, then (x - 0.5) / 0.5; gray repeated to 3 channels for a 3-channel encoder"


def build_encoder(arch="resnet18", stem="imagenet", in_chans=3):
    encoder = getattr(torchvision.models, arch)(weights=None)
    if stem == "small":  # MedMNIST v2's 28 px choice: keep the full resolution into layer1
        encoder.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        encoder.maxpool = nn.Identity()
    elif in_chans != 3:
        encoder.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    encoder.fc = nn.Identity()  # features out; heads live outside the encoder
    return encoder


def mlp(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor (Grill et al. 2020 §3.3; paper 001
    uses 4096 -> 256). A single Linear predictor, as in paper 001's code, is not BYOL."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def _imagenet_state_dict(arch):
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception:
        raise UserError(f"cannot download ImageNet weights for {arch} (offline?); fetch {weights.url} "
                        f"where there is internet and pass its path: --init /path/to/{weights.url.split('/')[-1]}")


def _adapt_state_dict(state, encoder, stem, in_chans):
    """Fit an ImageNet-layout state dict to this encoder: drop fc, sum conv1 over RGB for 1-channel
    input (the usual gray adaptation), keep conv1 random when the small stem's 3x3 cannot take it."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    if w is not None and w.shape != encoder.conv1.weight.shape:
        if stem == "small" or w.shape[2:] != encoder.conv1.weight.shape[2:]:
            print("note: conv1 left randomly initialised (the checkpoint's 7x7 stem does not fit the small stem)")
            state.pop("conv1.weight")
        elif in_chans == 1 and w.shape[1] == 3:
            state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    return state


def load_encoder(init="random", arch="resnet18", stem="imagenet", in_chans=3):
    """An encoder from `random`, `imagenet` (torchvision weights API) or a file: one of our
    checkpoints (its `encoder`), or a torchvision-layout state dict (.pth) for offline users."""
    encoder = build_encoder(arch, stem, in_chans)
    if init == "random":
        return encoder
    if init == "imagenet":
        state = _imagenet_state_dict(arch)
    elif init == "barlowtwins":
        state = barlowtwins_state_dict(arch)
    else:
        state = load_checkpoint(init)
        if isinstance(state, dict) and "encoder" in state and "meta" in state:
            check_meta(state["meta"], init, arch, stem, in_chans)
            state = state["encoder"]
        elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
            held = f"a bare {type(state).__name__}" if not isinstance(state, dict) else "a dict of other values"
            raise UserError(f"{escape(init)} holds {held}, not a MedSSL checkpoint nor a ResNet state dict; pass "
                            f"a checkpoint.pt of a MedSSL pretraining run or a torchvision-layout state dict (.pth)")
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a diverged run's weights: training from them would stop at the NaN guard, or worse
            raise UserError(f"{init} holds non-finite weights (NaN or inf, first in {bad[0]}); it cannot "
                            f"initialise an encoder: use a checkpoint of a run that did not diverge")
    state = _adapt_state_dict(state, encoder, stem, in_chans)
    wanted = encoder.state_dict()
    clash = [k for k, v in state.items() if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
    if clash:  # load_state_dict would end in a traceback listing every shape
        raise UserError(f"{escape(init)} holds {describe_state(state)}, not the {arch} / {stem} stem / "
                        f"{in_chans}-channel encoder asked for ({clash[0]} is {tuple(state[clash[0]].shape)}, not "
                        f"{tuple(wanted[clash[0]].shape)}); pass the matching --arch / --stem / --in-chans")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "conv1.weight" or "conv1.weight" in state]
    if missing or unexpected:
        raise UserError(f"{escape(init)} holds {describe_state(state)}, which does not fit a {arch} encoder (missing "
                        f"{escape(missing[:3])}, unexpected {escape(unexpected[:3])}); check --arch / --stem / --in-chans")
    return encoder


def describe_state(state):
    """What a ResNet-layout state dict holds, in words: its depth and its stem's kernel and channels."""
    conv1 = state.get("conv1.weight")
    arch = "resnet50" if "layer1.0.conv3.weight" in state else \
        "resnet18" if "layer1.1.conv2.weight" in state and "layer3.0.conv1.weight" in state else "an unknown network"
    if conv1 is None or conv1.ndim != 4:
        return f"{arch} weights"
    stem = "small (3x3)" if conv1.shape[-1] == 3 else "imagenet (7x7)" if conv1.shape[-1] == 7 else f"{conv1.shape[-1]}x{conv1.shape[-1]}"
    return f"a {arch} with a {stem} stem and {conv1.shape[1]}-channel input"


def check_meta(meta, path, arch, stem, in_chans):
    """The metadata of a MedSSL checkpoint, checked: a dict of this format and version, with an encoder
    this code can build, matching any of arch / stem / in_chans given (None: any)."""
    if not isinstance(meta, dict) or meta.get("format") != "medssl":
        raise UserError(f"{escape(path)} is not a MedSSL checkpoint (its 'meta' is missing or not MedSSL's); pass the "
                        f"checkpoint.pt of a pretraining run, or give a torchvision state dict with --init")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{escape(path)} has checkpoint format {escape(version)}, newer than this MedSSL's "
                        f"{FORMAT_VERSION}; update MedSSL (git pull) to read it")
    for key, allowed in (("arch", tuple(FEATURE_DIM)), ("stem", STEMS), ("in_chans", (1, 3))):
        if meta.get(key) not in allowed:
            raise UserError(f"{escape(path)}: its meta names {key} {escape(repr(meta.get(key)))}, not one of "
                            f"{', '.join(map(str, allowed))}; the file is damaged or not a MedSSL checkpoint")
    for key, want in (("arch", arch), ("stem", stem), ("in_chans", in_chans)):
        if want is not None and meta.get(key) != want:
            raise UserError(f"{escape(path)} holds a {meta.get('arch')} / {meta.get('stem')} stem / "
                            f"{meta.get('in_chans')}-channel encoder, not the {key} {want} asked for; "
                            f"drop --{key.replace('_', '-')} or pass --{key.replace('_', '-')} {meta.get(key)}")
    scaling = meta.get("input_scaling", INPUT_SCALING)
    if scaling != INPUT_SCALING:
        raise UserError(f"{escape(path)} was trained on inputs scaled as {escape(scaling)!r}; this MedSSL feeds "
                        f"{INPUT_SCALING!r}: evaluate it with the MedSSL version that wrote it")


def checkpoint_meta(path):
    """(meta, epoch) of a MedSSL pretraining checkpoint, checked (check_meta): its metadata and the
    number of epochs it had finished when saved. Read once per file version in a process."""
    try:
        stat = os.stat(path)
    except OSError:
        return _checkpoint_meta(path, None)  # load_checkpoint names what is wrong
    return _checkpoint_meta(path, (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _checkpoint_meta(path, version):
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "meta" not in checkpoint:
        held = f"a bare {type(checkpoint).__name__}" if not isinstance(checkpoint, dict) else "a dict without 'meta'"
        raise UserError(f"{escape(path)} holds {held}, not a MedSSL checkpoint; pass the checkpoint.pt of a "
                        f"pretraining run, or give a torchvision state dict with --init")
    check_meta(checkpoint["meta"], path, None, None, None)
    return checkpoint["meta"], checkpoint.get("epoch")


@torch.no_grad()
def features(encoder, images, in_chans, batch_size=512, resize=None, index=None, precision=None):
    """Frozen-encoder features (float32, on the encoder's device) of a whole uint8 split, or of its
    rows `index`, in eval mode (BN running statistics); the images may be in pinned host memory
    (data.batch brings each batch over); resize: see data.to_input. precision: the run's
    common.precision.Precision, whose autocast and memory layout the forward passes take; None:
    channels_last inputs and no autocast of its own."""
    from common.data import batch, to_input
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    n = len(images) if index is None else len(index)
    rows = (lambda i: slice(i, i + batch_size)) if index is None else (lambda i: index[i:i + batch_size])
    memory_format = torch.channels_last if precision is None else precision.memory_format
    with contextlib.nullcontext() if precision is None else precision.autocast(device.type):
        out = torch.cat([encoder(to_input(batch(images, rows(i), device), in_chans, resize).contiguous(
            memory_format=memory_format)).float() for i in range(0, n, batch_size)])
    encoder.train(was_training)
    return out


# ---------------------------------------------------------------- Barlow Twins
# facebookresearch/barlowtwins' ImageNet ResNet-50 (Zbontar et al. 2021, 1000 epochs; paper 003's
# "SSL" base model). torch.hub fetches its hubconf, which downloads this file.
BARLOWTWINS_HUB = "facebookresearch/barlowtwins:main"
BARLOWTWINS_URL = ("https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/"
                   "resnet50.pth")


def barlowtwins_state_dict(arch):
    """State dict of the official Barlow Twins ResNet-50 through torch.hub (online users); offline,
    a one-line error saying where to fetch the file for `--init /path/to/resnet50.pth`."""
    if arch != "resnet50":
        raise UserError(f"--init barlowtwins is facebookresearch's ImageNet ResNet-50; add --arch resnet50 "
                        f"(asked for {arch})")
    try:
        model = torch.hub.load(BARLOWTWINS_HUB, "resnet50", trust_repo=True)
    except Exception as e:  # URLError, HTTPError, OSError, RuntimeError ... all mean "could not fetch"
        raise UserError(f"cannot fetch {BARLOWTWINS_HUB} through torch.hub ({type(e).__name__}; offline?); "
                        f"where there is internet download {BARLOWTWINS_URL} and pass --init /path/to/resnet50.pth")
    return model.state_dict()


def projector_sizes(spec, flag="--projector"):
    """[512] from "512", [8192, 8192, 8192] from "8192-8192-8192"; a UserError naming `flag` otherwise."""
    try:
        sizes = [int(s) for s in str(spec).split("-")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise UserError(f"{flag} {spec!r} is not a list of layer widths; use e.g. 512 or 8192-8192-8192")
    return sizes


def projector(in_dim, spec):
    """Barlow Twins projector from a string of layer widths: "512" is one Linear layer (paper 002's
    best), "8192-8192-8192" is Linear-BN-ReLU, Linear-BN-ReLU, Linear (Zbontar et al. 2021 §2;
    paper 003 §3.7). No Linear has a bias: BN follows the hidden ones, and the loss standardises
    the output along the batch, which cancels a bias of the last one (as Zbontar et al. do)."""
    dims = [in_dim, *projector_sizes(spec)]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- freezing parts of an encoder
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _stage(encoder, name):
    return [encoder.conv1, encoder.bn1] if name == "stem" else [getattr(encoder, name)]


def _train_only(encoder, modules):
    """requires_grad on the parameters of `modules` only; returns the trainable parameter count."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def set_trainable(encoder, which):
    """Further pretraining's trainable part (paper 003 §3.7): "all"; "none" (its first epoch trains
    the projector alone); "layer4"; or "last-block", the last residual block of layer4 alone (in a
    ResNet-50 the 1x1-3x3-1x1 bottleneck that paper 003 calls the final 3 layers, "SSLp"; in a
    ResNet-18 a basic block). Returns the encoder's trainable parameter count."""
    parts = {"all": [encoder], "none": [], "layer4": [encoder.layer4], "last-block": [encoder.layer4[-1]]}
    if which not in parts:
        raise UserError(f"unknown trainable part {which!r}; use one of {', '.join(parts)}")
    return _train_only(encoder, parts[which])


def freeze_through(encoder, stage):
    """Freeze the stem and every stage up to and including `stage` (paper 002's freezing study):
    "layer3" leaves layer4 trainable ("layer4 + fc"), "layer4" leaves only the head outside the
    encoder, "none" freezes nothing. Returns the encoder's trainable parameter count."""
    if stage != "none" and stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; use none or one of {', '.join(STAGES)}")
    n_frozen = 0 if stage == "none" else STAGES.index(stage) + 1
    return _train_only(encoder, [m for name in STAGES[n_frozen:] for m in _stage(encoder, name)])


def frozen_bn_eval(module):
    """Put every BatchNorm whose parameters are all frozen into eval mode (call after .train()): it
    then normalises with its running statistics and leaves them untouched, so a frozen block is a
    fixed function. (fastai's freeze, used by paper 003's code, keeps such BN layers training and
    their affine weights trainable; --frozen-bn train keeps them in training mode, weights frozen.)"""
    for m in module.modules():
        params = list(m.parameters())
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()
    return module


def knn_val_auc(encoder, train, val, in_chans, k=20, precision=None):
    """kNN AUC of the encoder's frozen features on a validation split (train split = the memory):
    a cheap sign, during pretraining, of whether the representation improves. precision: see features."""
    from common import metrics
    memory = features(encoder, train.images, in_chans, precision=precision)
    queries = features(encoder, val.images, in_chans, precision=precision)
    scores = metrics.knn_scores(memory, train.labels, queries, k=k, task=train.task, n_classes=train.n_classes)
    return metrics.auc(val.labels.cpu().numpy(), scores, train.task)
