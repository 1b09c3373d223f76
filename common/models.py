"""torchvision ResNet backbones without `fc`, their initialisation, and the MLP heads of BYOL.

The encoder keeps torchvision's module names, so its state dict loads into
`torchvision.models.resnet18()` (or 50) with only `fc` missing."""
import torch
import torchvision
from torch import nn

from common.utils import UserError, load_checkpoint

FEATURE_DIM = {"resnet18": 512, "resnet50": 2048}


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
    else:
        state = load_checkpoint(init)
        if isinstance(state, dict) and "encoder" in state and "meta" in state:
            check_meta(state["meta"], init, arch, stem, in_chans)
            state = state["encoder"]
        elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f"{init} is not a MedSSL checkpoint nor a ResNet state dict")
    state = _adapt_state_dict(state, encoder, stem, in_chans)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "conv1.weight" or "conv1.weight" in state]
    if missing or unexpected:
        raise UserError(f"{init} does not fit a {arch} encoder (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); check --arch / --stem / --in-chans")
    return encoder


def check_meta(meta, path, arch, stem, in_chans):
    if meta.get("format") != "medssl":
        raise UserError(f"{path} is not a MedSSL checkpoint")
    for key, want in (("arch", arch), ("stem", stem), ("in_chans", in_chans)):
        if want is not None and meta.get(key) != want:
            raise UserError(f"{path} holds a {meta.get('arch')} / {meta.get('stem')} stem / "
                            f"{meta.get('in_chans')}-channel encoder, not the {key} {want} asked for; "
                            f"drop --{key.replace('_', '-')} or pass --{key.replace('_', '-')} {meta.get(key)}")


@torch.no_grad()
def features(encoder, images, in_chans, batch_size=512):
    """Frozen-encoder features of a whole uint8 split, in eval mode (BN running statistics)."""
    from common.data import to_input
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(to_input(images[i:i + batch_size], in_chans).contiguous(
        memory_format=torch.channels_last)).float() for i in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return out
