"""Encoders (torchvision ResNets without `fc`, any timm model), their initialisation, and the MLP heads.

A ResNet keeps torchvision's module names, so its state dict loads into `torchvision.models.resnet18()`
(or 50) with only `fc` missing; a timm encoder's state dict loads into `timm.create_model(arch,
num_classes=0, in_chans=.., img_size=.., patch_size=..)` (the ViT arguments for a ViT) as it is."""
import contextlib
import functools
import os

import torch
import torchvision
from torch import nn

from common import flags
from common.errors import UserError, escape

from common.rundir import load_checkpoint

FEATURE_DIM = {"resnet18": 512, "resnet50": 2048}  # the torchvision ResNets; any encoder: feature_dim()
RESNETS = tuple(FEATURE_DIM)
STEMS = ("imagenet", "small")
POOLS = ("cls", "mean")
# timm modules whose models are VisionTransformer (or a subclass): they take img_size / patch_size /
# global_pool / dynamic_img_size
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
# The checkpoint layout this code writes and reads; a higher number was written by a newer MedSSL.
FORMAT_VERSION = 1
# How pixels reach the encoder (common.data.to_input), recorded in every checkpoint so that an
# evaluation can check it feeds the encoder what it was trained on.
INPUT_SCALING = "uint8 / 255, then (x - 0.5) / 0.5; gray repeated to 3 channels for a 3-channel encoder"


# ---------------------------------------------------------------- which encoder an --arch names
def _timm():
    # MEDSSL_NO_DOWNLOAD=1 (the project's offline switch) must also stop the hub's retries, and
    # huggingface_hub reads HF_HUB_OFFLINE when it is first imported
    if os.environ.get("MEDSSL_NO_DOWNLOAD") == "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    return timm


def check_arch(arch):
    """A UserError unless `arch` is a torchvision ResNet or a timm model name."""
    if arch in RESNETS:
        return arch
    if not isinstance(arch, str) or not _timm().is_model(arch):
        raise UserError(f"--arch {escape(arch)!r} is neither resnet18 / resnet50 nor a timm model name; list timm's "
                        f"with python -c \"import timm; print(timm.list_models('vit_*'))\" (or 'convnext*', ...)")
    return arch


def vit_arch(arch):
    """Whether `arch` names a timm VisionTransformer (ViT, DeiT), which --patch-size and --pool configure."""
    if arch in RESNETS:
        return False
    check_arch(arch)
    return _timm().models.model_entrypoint(arch).__module__ in VIT_MODULES


def is_vit(encoder):
    """Whether `encoder` is a timm VisionTransformer: patch embedding, blocks, class token, position embedding."""
    return all(hasattr(encoder, name) for name in ("patch_embed", "blocks", "cls_token", "pos_embed"))


def feature_dim(encoder):
    """The width D of the (B, D) features `encoder` returns."""
    if hasattr(encoder, "num_features"):  # every timm model
        return int(encoder.num_features)
    return encoder.layer4[-1].conv3.out_channels if hasattr(encoder.layer4[-1], "conv3") \
        else encoder.layer4[-1].conv2.out_channels


def default_patch_size(size):
    """A ViT's patch side for images of `size` px: 4 up to 32 px (7 x 7 patches at 28 px), 8 up to 96 px
    (8 x 8 at 64 px), 16 above (the papers' ViT-S/16 and ViT-B/16 at 224 px: 14 x 14)."""
    patch = 4 if size <= 32 else 8 if size <= 96 else 16
    if size % patch:
        raise UserError(f"a ViT cuts {size} px images into patches, and the default patch side {patch} does not "
                        f"divide {size}; pass a --patch-size that divides {size}")
    return patch


def encoder_settings(arch, size=28, patch_size=None, pool=None):
    """The ViT settings an encoder is built with, resolved: {"patch_size": P, "pool": "cls" | "mean"} for
    a ViT (P from default_patch_size when None, pool "cls" when None), both None for other encoders
    (which average-pool their last feature map), checked: a UserError names the flag that does not fit."""
    check_arch(arch)
    if pool is not None and pool not in POOLS:
        raise UserError(f"--pool {escape(pool)!r}: use cls or mean")
    if not vit_arch(arch):
        if patch_size is not None:
            raise UserError(f"--patch-size {patch_size} configures a ViT, not --arch {arch}; drop --patch-size")
        if pool == "cls":
            raise UserError(f"--pool cls takes a ViT's class token; --arch {arch} has none: drop --pool")
        return {"patch_size": None, "pool": None}
    if patch_size is None:
        patch_size = default_patch_size(size)
    if not isinstance(patch_size, int) or patch_size < 1 or size % patch_size:
        raise UserError(f"--patch-size {patch_size} does not divide the {size} px images into whole patches; "
                        f"pass a --patch-size that divides {size} (e.g. {default_patch_size_hint(size)})")
    return {"patch_size": patch_size, "pool": pool or "cls"}


def default_patch_size_hint(size):
    return next((p for p in (4, 8, 16, 2, 7, 14, 1) if size % p == 0), 1)


def build_encoder(arch="resnet18", stem="imagenet", in_chans=3, size=28, patch_size=None, pool=None,
                  pretrained=False):
    """The encoder, returning pooled (B, D) features: a torchvision ResNet without fc (`stem` small: a 3x3/1
    conv without max-pool, MedMNIST v2's 28 px choice), or timm.create_model(arch) without its classifier
    for `in_chans`; a ViT for `size` px images cut into `patch_size` patches (default_patch_size), pooling
    its class token (pool "cls") or the mean of its patch tokens ("mean"), its position embedding
    interpolated for other sides (DINO's smaller local crops). pretrained: timm's ImageNet weights."""
    settings = encoder_settings(arch, size, patch_size, pool)
    if arch in RESNETS:
        return _build_resnet(arch, stem, in_chans)
    if stem == "small":
        raise UserError(f"--stem small is a ResNet stem; --arch {arch} has its own: drop --stem")
    timm = _timm()
    kwargs = dict(pretrained=pretrained, num_classes=0, in_chans=in_chans)
    if settings["patch_size"] is not None:
        kwargs.update(img_size=size, patch_size=settings["patch_size"], dynamic_img_size=True,
                      global_pool="token" if settings["pool"] == "cls" else "avg")
    encoder = timm.create_model(arch, **kwargs)
    if settings["patch_size"] is None:
        _check_takes_size(encoder, arch, in_chans, size)
    return encoder


def _check_takes_size(encoder, arch, in_chans, size):
    """A convnet whose total stride shrinks `size` px images to nothing fails here, in one line, rather
    than at the first training step (a forward of one blank image in eval mode, no gradients)."""
    was_training = encoder.training
    try:
        with torch.no_grad():
            out = encoder.eval()(torch.zeros(1, in_chans, size, size))
        ok = out.ndim == 2 and out.shape[1] == feature_dim(encoder)
    except RuntimeError:
        ok = False
    encoder.train(was_training)
    if not ok:
        raise UserError(f"--arch {arch} cannot take {size} px images (its strides shrink them to nothing); use a "
                        f"larger --size, or a ViT (e.g. --arch vit_tiny_patch16_224, patches sized to the images)")


def _build_resnet(arch, stem, in_chans):
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


def _timm_imagenet(arch, in_chans, size, patch_size, pool):
    """timm's pretrained weights for `arch` (its default tag, ImageNet for most), through the Hugging
    Face hub, fitted by timm to in_chans, the patch side and the position grid; offline, a one-line error
    saying which file to fetch for --init."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(arch)
    where = (f"hf download {cfg.hf_hub_id} model.safetensors" if cfg is not None and cfg.hf_hub_id
             else f"python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"")
    fix = (f"fetch the weights where there is internet ({where}) and pass the file: "
           f"--init /path/to/model.safetensors")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"timm has no pretrained weights for {arch}; use --init random or another --arch")
    if os.environ.get("MEDSSL_NO_DOWNLOAD") == "1":
        raise UserError(f"cannot download timm's weights for {arch}: downloads are off (MEDSSL_NO_DOWNLOAD=1); {fix}")
    try:
        return build_encoder(arch, "imagenet", in_chans, size, patch_size, pool, pretrained=True)
    except UserError:
        raise
    except Exception as e:  # OSError, LocalEntryNotFoundError, HTTPError ...: could not fetch
        raise UserError(f"cannot download timm's weights for {arch} ({type(e).__name__}; offline?); {fix}")


def _read_state_file(path):
    """The tensors of a .safetensors file, or what a .pt / .pth holds (rundir.load_checkpoint: tensors only)."""
    if str(path).endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist")
        safetensors = _require_safetensors()
        try:
            return safetensors.load_file(path, device="cpu")
        except Exception as e:
            raise UserError(f"{escape(path)} is truncated or corrupt ({type(e).__name__}); copy it again")
    return load_checkpoint(path)


def _require_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("reading a .safetensors file needs the package safetensors; pip install safetensors")
    return safetensors.torch


def _tensors(state, init, what):
    """A state dict of finite tensors out of what a file held, or a one-line UserError."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):  # timm / DeiT / MAE training checkpoints
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        held = f"a bare {type(state).__name__}" if not isinstance(state, dict) else "a dict of other values"
        raise UserError(f"{escape(init)} holds {held}, not a MedSSL checkpoint nor {what}; pass "
                        f"a checkpoint.pt of a MedSSL pretraining run or {what}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run's weights: training from them would stop at the NaN guard, or worse
        raise UserError(f"{init} holds non-finite weights (NaN or inf, first in {bad[0]}); it cannot "
                        f"initialise an encoder: use a checkpoint of a run that did not diverge")
    return state


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


def _adapt_timm_state(state, encoder, in_chans):
    """Fit a timm-layout state dict to this timm encoder: its classifier dropped; for a ViT, timm's own
    conversion (other layouts such as DINOv2's, the position embedding resampled to this grid, the
    patch embedding to this patch side); the first conv summed over RGB for 1 channel (timm's
    adapt_input_conv); the final LayerNorm of the other pooling left fresh, as MAE fine-tunes its
    mean-pooled ViT (He et al. 2022, A.1: fc_norm new, the class token's norm unused)."""
    timm = _timm()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    wanted = encoder.state_dict()
    cfg = getattr(encoder, "pretrained_cfg", {}) or {}
    classifiers = cfg.get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state = {k: v for k, v in state.items() if not k.startswith(name + ".") or k in wanted}
    if is_vit(encoder):
        state = timm.models.vision_transformer.checkpoint_filter_fn(state, encoder)
        dropped = [k for k in state if k.split(".")[0] in ("norm", "fc_norm") and k not in wanted]
        if dropped:
            print(f"note: {dropped[0].split('.')[0]} of the checkpoint left out: this ViT pools with "
                  f"{'fc_norm' if 'fc_norm.weight' in wanted else 'norm'} (--pool), which starts fresh")
            state = {k: v for k, v in state.items() if k not in dropped}
            state.update({k: wanted[k] for k in wanted if k.split(".")[0] in ("norm", "fc_norm") and k not in state})
    first = cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else (first or ()):
        w = state.get(name + ".weight")
        target = wanted.get(name + ".weight")
        if w is not None and target is not None and w.ndim == 4 and w.shape[1] != target.shape[1]:
            state[name + ".weight"] = timm.models.adapt_input_conv(in_chans, w)
    return state


def load_encoder(init="random", arch="resnet18", stem="imagenet", in_chans=3, size=28, patch_size=None, pool=None):
    """An encoder (build_encoder) from `random`, `imagenet` (torchvision's weights API for a ResNet,
    timm's hub weights for a timm model) or a file: one of our checkpoints (its `encoder`; a ViT's
    patch side and pooling default to those it was trained with), or a torchvision-layout (ResNet) /
    timm-layout (.pth, .safetensors) state dict for offline users."""
    check_arch(arch)
    if init == "random":
        return build_encoder(arch, stem, in_chans, size, patch_size, pool)
    if arch not in RESNETS:
        return _load_timm(init, arch, stem, in_chans, size, patch_size, pool)
    encoder = build_encoder(arch, stem, in_chans, size, patch_size, pool)
    if init == "imagenet":
        state = _imagenet_state_dict(arch)
    elif init == "barlowtwins":
        state = barlowtwins_state_dict(arch)
    else:
        state = _read_state_file(init)
        if isinstance(state, dict) and "encoder" in state and "meta" in state:
            check_meta(state["meta"], init, arch, stem, in_chans)
            state = state["encoder"]
        state = _tensors(state, init, "a ResNet state dict (torchvision layout, .pth)")
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


def _load_timm(init, arch, stem, in_chans, size, patch_size, pool):
    if init == "imagenet":
        return _timm_imagenet(arch, in_chans, size, patch_size, pool)
    if init == "barlowtwins":
        barlowtwins_state_dict(arch)  # refuses any arch but resnet50
    state = _read_state_file(init)
    if isinstance(state, dict) and "encoder" in state and "meta" in state:
        meta = state["meta"]
        check_meta(meta, init, arch, stem, in_chans, patch_size, pool)
        patch_size = patch_size or meta.get("patch_size")
        pool = pool or meta.get("pool")
        state = state["encoder"]
    state = _tensors(state, init, f"a timm-layout {arch} state dict (.pth, .safetensors)")
    encoder = build_encoder(arch, stem, in_chans, size, patch_size, pool)
    try:
        state = _adapt_timm_state(state, encoder, in_chans)
    except Exception as e:  # a layout timm's conversion cannot read
        raise UserError(f"{escape(init)} does not convert to a {arch} ({type(e).__name__}: "
                        f"{escape(str(e).splitlines()[0] if str(e) else '')}); pass a state dict of that --arch")
    wanted = encoder.state_dict()
    clash = [k for k, v in state.items() if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
    if clash:
        raise UserError(f"{escape(init)} does not fit the {arch} / {in_chans}-channel encoder asked for ({clash[0]} is "
                        f"{tuple(state[clash[0]].shape)}, not {tuple(wanted[clash[0]].shape)}); pass the matching "
                        f"--arch / --in-chans" + (" / --patch-size" if is_vit(encoder) else ""))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{escape(init)} does not fit a {arch} encoder (missing {escape(missing[:3])}, unexpected "
                        f"{escape(unexpected[:3])}); check --arch")
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


def _known_arch(arch):
    try:
        return check_arch(arch) is not None
    except UserError:
        return False


def check_meta(meta, path, arch, stem, in_chans, patch_size=None, pool=None):
    """The metadata of a MedSSL checkpoint, checked: a dict of this format and version, with an encoder
    this code can build (a ResNet or a timm model), matching any of arch / stem / in_chans / patch_size /
    pool given (None: any). A checkpoint written without patch_size / pool holds a ResNet."""
    if not isinstance(meta, dict) or meta.get("format") != "medssl":
        raise UserError(f"{escape(path)} is not a MedSSL checkpoint (its 'meta' is missing or not MedSSL's); pass the "
                        f"checkpoint.pt of a pretraining run, or give a torchvision or timm state dict with --init")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{escape(path)} has checkpoint format {escape(version)}, newer than this MedSSL's "
                        f"{FORMAT_VERSION}; update MedSSL (git pull) to read it")
    if not _known_arch(meta.get("arch")):
        raise UserError(f"{escape(path)}: its meta names arch {escape(repr(meta.get('arch')))}, neither resnet18 / "
                        f"resnet50 nor a timm model of this timm; the file is damaged or not a MedSSL checkpoint, or "
                        f"needs another timm version")
    for key, allowed in (("stem", STEMS), ("in_chans", (1, 3)), ("pool", (None, *POOLS))):
        if meta.get(key) not in allowed:
            raise UserError(f"{escape(path)}: its meta names {key} {escape(repr(meta.get(key)))}, not one of "
                            f"{', '.join(map(str, allowed))}; the file is damaged or not a MedSSL checkpoint")
    if meta.get("patch_size") is not None and not (isinstance(meta["patch_size"], int) and meta["patch_size"] >= 1):
        raise UserError(f"{escape(path)}: its meta names patch_size {escape(repr(meta['patch_size']))}; the file is "
                        f"damaged or not a MedSSL checkpoint")
    for key, want in (("arch", arch), ("stem", stem), ("in_chans", in_chans), ("patch_size", patch_size),
                      ("pool", pool)):
        if want is not None and meta.get(key) != want:
            held = f"a {meta.get('arch')} / {meta.get('stem')} stem / {meta.get('in_chans')}-channel encoder" + (
                f" with {meta.get('patch_size')} px patches and {meta.get('pool')} pooling"
                if meta.get("patch_size") else "")
            raise UserError(f"{escape(path)} holds {held}, not the {key} {want} asked for; "
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


def resolve_encoder(ckpt, init, arch, stem, in_chans, patch_size, pool, size, resize=None, doing="evaluating"):
    """The encoder a script works on, as a dict of its flags' values (init, arch, stem, in_chans,
    patch_size, pool, size, encoder_size): a checkpoint's recorded settings (a flag that conflicts with
    them is refused), else the flags, else MedSSL's defaults. `size` (the images' side) defaults to the
    side the checkpoint was pretrained at, which is noted, and one that differs from it is warned about;
    `encoder_size` is the side the encoder is built for (a ViT's position embedding): the pretraining's,
    else the side it sees."""
    pretrained_size = None
    if ckpt:
        meta, _ = checkpoint_meta(ckpt)
        check_meta(meta, ckpt, arch, stem, in_chans, patch_size, pool)
        arch, stem, in_chans = meta["arch"], meta["stem"], meta["in_chans"]
        patch_size, pool = meta.get("patch_size"), meta.get("pool")
        pretrained_size = meta.get("size") or meta.get("args", {}).get("size")
        if size is None and pretrained_size:
            size = pretrained_size
            print(f"note: {doing} at {size} px, the size {escape(ckpt)} was pretrained at", flush=True)
        elif pretrained_size and size != pretrained_size:
            print(f"warning: {escape(ckpt)} was pretrained on {pretrained_size} px images; {doing} at --size {size} "
                  f"as asked (drop --size to use {pretrained_size})", flush=True)
    size = size or 28
    arch = arch or "resnet18"
    encoder_size = pretrained_size or resize or size
    settings = encoder_settings(arch, encoder_size, patch_size, pool)
    return {"init": ckpt or init or "random", "arch": arch, "stem": stem or "imagenet", "in_chans": in_chans or 3,
            "patch_size": settings["patch_size"], "pool": settings["pool"], "size": size,
            "encoder_size": encoder_size}


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
STAGES = flags.STAGES  # the stages --freeze names


def _vit_groups(encoder):
    """A ViT's blocks in the four groups that stand for layer1-4 (12 blocks: 3 each; the earlier groups
    take one less when the depth does not split evenly)."""
    blocks = list(encoder.blocks)
    cuts = [round(len(blocks) * i / 4) for i in range(5)]
    return [blocks[cuts[i]:cuts[i + 1]] for i in range(4)]


def _vit_head_norms(encoder):
    return [m for m in (getattr(encoder, "norm", None), getattr(encoder, "fc_norm", None)) if m is not None]


def _stage(encoder, name):
    if is_vit(encoder):  # stem: the patch embedding with the class / register tokens and position embedding
        if name == "stem":
            tokens = [getattr(encoder, t) for t in ("cls_token", "reg_token", "pos_embed")]
            return [encoder.patch_embed, *(t for t in tokens if isinstance(t, nn.Parameter))]
        group = _vit_groups(encoder)[STAGES.index(name) - 1]
        return group + (_vit_head_norms(encoder) if name == "layer4" else [])
    if not hasattr(encoder, "layer4"):
        raise UserError(f"--freeze / --trainable name ResNet stages (or a ViT's blocks in 4 groups); this "
                        f"{type(encoder).__name__} has neither: use --freeze none (--trainable all)")
    return [encoder.conv1, encoder.bn1] if name == "stem" else [getattr(encoder, name)]


def _train_only(encoder, parts):
    """requires_grad on the parameters of `parts` (modules or parameters) only; returns the trainable
    parameter count."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    for m in parts:
        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()):
            p.requires_grad_(True)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def set_trainable(encoder, which):
    """Further pretraining's trainable part (paper 003 §3.7): "all"; "none" (its first epoch trains
    the projector alone); "layer4"; or "last-block", the last residual block of layer4 alone (in a
    ResNet-50 the 1x1-3x3-1x1 bottleneck that paper 003 calls the final 3 layers, "SSLp"; in a
    ResNet-18 a basic block). A ViT: layer4 is its last quarter of blocks, last-block its last block,
    each with the final LayerNorm. Returns the encoder's trainable parameter count."""
    choices = ("all", "none", "layer4", "last-block")
    if which not in choices:
        raise UserError(f"unknown trainable part {which!r}; use one of {', '.join(choices)}")
    if which in ("all", "none"):
        return _train_only(encoder, [encoder] if which == "all" else [])
    if which == "layer4" or not is_vit(encoder):
        layer4 = _stage(encoder, "layer4")
        return _train_only(encoder, layer4 if which == "layer4" else [encoder.layer4[-1]])
    return _train_only(encoder, [encoder.blocks[-1], *_vit_head_norms(encoder)])


def freeze_through(encoder, stage):
    """Freeze the stem and every stage up to and including `stage` (paper 002's freezing study):
    "layer3" leaves layer4 trainable ("layer4 + fc"), "layer4" leaves only the head outside the
    encoder, "none" freezes nothing. A ViT's stages: the patch embedding (with the class token and
    position embedding) as the stem, its blocks in four groups as layer1-4, the final LayerNorm with
    layer4. Returns the encoder's trainable parameter count."""
    if stage != "none" and stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; use none or one of {', '.join(STAGES)}")
    if stage == "none":
        return _train_only(encoder, [encoder])
    n_frozen = STAGES.index(stage) + 1
    return _train_only(encoder, [m for name in STAGES[n_frozen:] for m in _stage(encoder, name)])


# ---------------------------------------------------------------- layer-wise lr decay (BEiT, MAE)
def layer_ids(encoder):
    """(layer_of, n_layers) for optim.layer_decay_groups: layer_of(parameter name) -> 0 .. n_layers, 0
    nearest the input, n_layers for the top (the head outside the encoder: any name the encoder does not
    have). A ViT as BEiT and MAE number it: patch embedding and tokens 0, block i (from 0) i + 1, the final
    norm and the head depth + 1 (timm's grouping puts a class-token ViT's final norm with its last block,
    whose lr would then not decay). Other timm models: timm's own groups (group_matcher), the head above
    them; a ResNet: stem 0, layer1-4 1-4, the head 5."""
    if is_vit(encoder):
        depth = len(encoder.blocks)

        def vit_layer(name):
            if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
                return 0
            return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1
        return vit_layer, depth + 1
    if hasattr(encoder, "group_matcher"):
        from timm.models._manipulate import group_parameters
        ids = group_parameters(encoder, encoder.group_matcher(coarse=False), reverse=True)
        top = max(ids.values()) + 1
    else:
        ids = {name: (STAGES.index(name.split(".")[0]) if name.split(".")[0] in STAGES else 0)
               for name, _ in encoder.named_parameters()}
        top = len(STAGES)
    return (lambda name: ids.get(name, top)), top


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
