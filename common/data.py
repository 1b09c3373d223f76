"""MedMNIST 2D datasets held whole on the training device as uint8 tensors, and seeded subsets.

A split is one (N, C, H, W) uint8 tensor plus its labels; batches are index slices of it, so there
is no per-sample Python and no DataLoader (DESIGN.md, data flow 1-2)."""
import hashlib
import os
from dataclasses import dataclass

import medmnist
import numpy as np
import torch
from medmnist import INFO

from common.cli import UserError

FLAGS_2D = sorted(flag for flag, info in INFO.items() if not info["python_class"].endswith("3D"))
SIZES = (28, 64, 128, 224)


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W) on the device, C = 1 (gray) or 3 (RGB)
    labels: torch.Tensor  # int64 (N,) class index, or (N, L) 0/1 for multi-label
    flag: str
    task: str             # medmnist's task string, e.g. "binary-class", "multi-label, binary-class"
    n_classes: int        # classes, or labels for multi-label


def file_name(flag, size):
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag, size):
    return INFO[flag]["MD5" if size == 28 else f"MD5_{size}"]


def data_root(root=None):
    return root or os.environ.get("MEDMNIST_ROOT") or medmnist.info.DEFAULT_ROOT


def check_flag(flag, size):
    if flag not in FLAGS_2D:
        raise UserError(f"unknown dataset {flag!r}; valid MedMNIST 2D flags: {', '.join(FLAGS_2D)}")
    if size not in SIZES:
        raise UserError(f"unsupported --size {size}; MedMNIST files exist at {', '.join(map(str, SIZES))}")


def _download(flag, size, root):
    """Fetch the file through the medmnist package (it checks the MD5 itself)."""
    if os.environ.get("MEDSSL_NO_DOWNLOAD"):
        raise RuntimeError("downloads disabled by MEDSSL_NO_DOWNLOAD")
    os.makedirs(root, exist_ok=True)
    getattr(medmnist, INFO[flag]["python_class"])(split="train", root=root, size=size, download=True)


_verified = {}  # path -> (size, mtime) already MD5-checked in this process


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(flag, size, root=None):
    """Path of the verified npz file; downloads it when missing; one-line errors otherwise."""
    check_flag(flag, size)
    root = data_root(root)
    path = os.path.join(root, file_name(flag, size))
    if not os.path.isfile(path):
        try:
            _download(flag, size, root)
        except Exception:
            raise UserError(f"{file_name(flag, size)} not found in {root} and it could not be downloaded "
                            f"(offline?); download it where there is internet (python -m medmnist download) "
                            f"and put it in that folder, or point --data-root / $MEDMNIST_ROOT at its folder")
    stat = os.stat(path)
    if _verified.get(path) != (stat.st_size, stat.st_mtime_ns):
        if _md5(path) != expected_md5(flag, size):
            raise UserError(f"{path} is modified or truncated (MD5 differs from medmnist's "
                            f"{expected_md5(flag, size)}); delete it and download it again")
        _verified[path] = (stat.st_size, stat.st_mtime_ns)
    return path


def load_split(flag, split, size=28, root=None, device="cpu", in_chans=3):
    """One split of one dataset as a Split on `device`."""
    path = locate(flag, size, root)
    info = INFO[flag]
    if in_chans == 1 and info["n_channels"] == 3:
        raise UserError(f"{flag} is RGB; --in-chans 1 needs gray images: use --in-chans 3")
    with np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    images = torch.from_numpy(images)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    labels = torch.from_numpy(labels.astype(np.int64))
    if not info["task"].startswith("multi-label"):
        labels = labels.reshape(-1)
    return Split(images.contiguous().to(device), labels.to(device), flag, info["task"], len(info["label"]))


def load_pretrain_images(flags, size=28, root=None, device="cpu", in_chans=3):
    """Train images (labels unused) of one or several datasets, e.g. "pneumoniamnist,breastmnist".
    Only the train split: self-supervised pretraining must never see evaluation images."""
    splits = [load_split(f.strip(), "train", size, root, "cpu", in_chans) for f in flags.split(",")]
    channels = max(s.images.shape[1] for s in splits)  # a gray + RGB union is held as RGB
    images = torch.cat([s.images.expand(-1, channels, -1, -1) for s in splits])
    return images.contiguous().to(device)


def monitor_splits(args, device):
    """Train and val splits of the first --data flag, for a pretraining script's kNN monitor
    (--eval-every), or None when it is off."""
    if not args.eval_every:
        return None
    first = args.data.split(",")[0]
    return [load_split(first, s, args.size, args.data_root, device, args.in_chans) for s in ("train", "val")]


def to_input(images, in_chans, resize=None):
    """uint8 (B, C, H, W) -> float, normalised with mean = std = 0.5 as paper 001 §3.2 did,
    gray repeated to 3 channels when the model takes 3 (paper 001 §3.2). resize: upsample to this
    side with nearest neighbours, as MedMNIST v2's "224" rows did with their 28 px images."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    if resize and x.shape[-1] != resize:
        x = torch.nn.functional.interpolate(x, size=(resize, resize), mode="nearest")
    x = (x - 0.5) / 0.5
    return x.expand(-1, 3, -1, -1) if in_chans == 3 and x.shape[1] == 1 else x


# ---------------------------------------------------------------- seeded subsets (numpy index arrays)
def _class_members(labels):
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if labels.ndim > 1:
        return None
    return {c: np.flatnonzero(labels == c) for c in np.unique(labels)}


def few_shot_indices(labels, shots, seed):
    """`shots` images of each class, drawn with `seed`."""
    members = _class_members(labels)
    if members is None:
        raise UserError("--shots needs single-label data; multi-label datasets have no 'per class' draw")
    if shots <= 0:
        raise UserError(f"--shots must be positive, got {shots}")
    rng = np.random.default_rng(seed)
    smallest = min(members, key=lambda c: len(members[c]))
    if len(members[smallest]) < shots:
        raise UserError(f"--shots {shots} is more than class {smallest} has ({len(members[smallest])} "
                        f"training images); use --shots {len(members[smallest])} or fewer")
    return np.sort(np.concatenate([rng.choice(idx, shots, replace=False) for idx in members.values()]))


def label_fraction_indices(labels, fraction, seed):
    """A stratified `fraction` of the split (each class keeps round(fraction * n_c), at least 1);
    multi-label data: a plain random fraction."""
    if not 0 < fraction <= 1:
        raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    members = _class_members(labels)
    if members is None:
        n = len(labels)
        return np.sort(rng.choice(n, max(1, round(fraction * n)), replace=False))
    return np.sort(np.concatenate([rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)
                                   for idx in members.values()]))


def undersample_indices(labels, ratio, seed):
    """Class-balanced undersampling to the minority's share `ratio` of each (minority, larger class)
    pair: paper 000 cut BreastMNIST to 60/40 (ratio 0.4) and PneumoniaMNIST to 50/50 (ratio 0.5)."""
    if not 0 < ratio <= 0.5:
        raise UserError(f"--balance is the minority's share after undersampling, in (0, 0.5]; got {ratio} "
                        f"(paper 000: 0.4 for 60/40, 0.5 for 50/50)")
    members = _class_members(labels)
    if members is None:
        raise UserError("--balance needs single-label data (multi-label classes overlap)")
    rng = np.random.default_rng(seed)
    cap = round(min(len(idx) for idx in members.values()) * (1 - ratio) / ratio)
    return np.sort(np.concatenate([rng.choice(idx, min(cap, len(idx)), replace=False)
                                   for idx in members.values()]))
