"""Datasets held whole as uint8 tensors (MedMNIST 2D flags, or a user's npz, folder or CSV manifest,
converted once by common.convert), each with its own description (DatasetInfo), and seeded subsets.

A split is one (N, C, H, W) uint8 tensor plus its labels; batches are index slices of it, so there
is no per-sample Python and no DataLoader. A split too large for the GPU
stays in pinned host memory and batch() gathers each batch there (docs/DATA.md)."""
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field

import medmnist
import numpy as np
import torch
from medmnist import INFO

from common import flags
from common.errors import UserError

FLAGS_2D = sorted(flag for flag, info in INFO.items() if not info["python_class"].endswith("3D"))
SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class DataOptions:
    """How own images are read; defaults are the flags' defaults (flags.add_data_flags)."""
    split_ratio: tuple = flags.SPLIT_RATIO  # train / val / test fractions of a drawn split
    label_columns: tuple = ()            # CSV 0/1 columns of a multi-label task
    uncertain: str = "error"             # CSV multi-label -1: error | zero | one
    blank: str = "zero"                  # CSV multi-label blank cell: zero | one | error
    crop: str = "center"                 # to square: center | pad | stretch
    cache_dir: str = None                # default $MEDSSL_CACHE, else .medssl-cache beside the data
    host_memory: bool = False            # keep splits in pinned host memory, batches copied per step
    split_seed: int = 0                  # seed of the drawn split (fixed: the split never changes)
    group_column: str = None             # CSV patient column, "folder" (DIR/<class>/<group>/), "none"; None:
    #                                      a CSV column named like convert.GROUP_COLUMNS, if any
    allow_group_leak: bool = False       # use a given split that puts a group in two splits (with a warning)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's own description: what scripts need to know instead of medmnist.INFO."""
    source: str        # the --data value: a MedMNIST flag, or a path (npz, folder, CSV)
    kind: str          # "medmnist", "npz", "folder" or "csv"
    task: str          # medmnist's task string, or "unlabeled"
    class_names: tuple  # label names in index order (empty when unlabeled)
    channels: int      # 1 gray, 3 RGB
    size: int          # image side in pixels
    hash: str          # MD5 of a MedMNIST file or a user's npz, else the cache key of a folder / CSV
    path: str          # the MedMNIST-layout npz the splits are read from
    # None: images taken as independent (no group known); else {"by": the CSV column, "folder" or "npz",
    # "groups": how many, "groups_in_several_splits": how many (0 unless --allow-group-leak), "split":
    # "drawn" (by group) or "given"}: JSON, for metrics.json
    grouping: dict = field(default=None, hash=False)

    @property
    def n_classes(self):
        return len(self.class_names)

    @property
    def labeled(self):
        return self.task != UNLABELED


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W) on the device (or pinned host memory, see place), C = 1 or 3
    labels: torch.Tensor  # int64 (N,) class index, or (N, L) 0/1 for multi-label
    flag: str             # the --data value
    task: str             # medmnist's task string, e.g. "binary-class", "multi-label, binary-class"
    n_classes: int        # classes, or labels for multi-label
    info: DatasetInfo = None


UNLABELED = "unlabeled"
TASKS = ("binary-class", "multi-class", "multi-label, binary-class")
CROPS, POLICIES = flags.CROPS, flags.POLICIES  # --crop and the CSV label policies (their flags: common/flags.py)


def file_name(flag, size):
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag, size):
    return INFO[flag]["MD5" if size == 28 else f"MD5_{size}"]


def data_root(root=None):
    return root or os.environ.get("MEDMNIST_ROOT") or medmnist.info.DEFAULT_ROOT


def check_flag(flag, size):
    if flag not in FLAGS_2D:
        raise UserError(f"unknown dataset {flag!r}; valid MedMNIST 2D flags: {', '.join(FLAGS_2D)}; own images: "
                        f"a path to an .npz file, a folder or a CSV manifest (docs/DATA.md)")
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


# ---------------------------------------------------------------- options of own data (flags.add_data_flags)
def options_from(values):
    """DataOptions from a mapping of flag values (e.g. vars(args)); absent ones keep their defaults."""
    fields = DataOptions.__dataclass_fields__
    return DataOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
                          if k in fields and v is not None})


# ---------------------------------------------------------------- what a --data value is
def describe(source, size=28, root=None, options=None):
    """The DatasetInfo of a --data value (one source, not a comma union); converts a folder or CSV
    into its npz cache when no cache matches it. Memoised per process: the three splits of a run
    scan a folder once."""
    return _resolve(source.strip(), size, data_root(root), options or DataOptions())


@functools.lru_cache(maxsize=64)
def _resolve(source, size, root, options):
    if size < 1:
        raise UserError(f"--size must be positive, got {size}")
    if source in FLAGS_2D:  # a bare flag is the flag, even beside a folder of that name (./flag reaches it)
        if os.path.exists(source):
            what = "folder" if os.path.isdir(source) else "file"
            print(f"note: --data {source} is the MedMNIST flag; for the {what} {os.path.abspath(source)} here, pass "
                  f"--data ./{source}", flush=True)
        path = locate(source, size, root)
        info = INFO[source]
        names = tuple(info["label"][k] for k in sorted(info["label"], key=int))
        return DatasetInfo(source, "medmnist", info["task"], names, info["n_channels"], size,
                           expected_md5(source, size), path)
    if not os.path.exists(source):
        if os.sep in source or "." in source:
            raise UserError(f"--data {source}: no such file or folder; give a MedMNIST flag, an .npz file, "
                            f"a folder of images or a CSV manifest")
        check_flag(source, size)
    if os.path.isdir(source) or source.lower().endswith(".csv"):
        from common import convert
        path, meta = convert.cached_npz(source, size, options)
        kind = "folder" if os.path.isdir(source) else "csv"
        return DatasetInfo(source, kind, meta["task"], tuple(meta["class_names"]), meta["channels"], size,
                           meta["hash"], path, meta.get("grouping"))
    if source.lower().endswith(".npz"):
        return _describe_npz(source, size, options)
    raise UserError(f"--data {source}: not a folder, .csv or .npz file; give one of these or a MedMNIST flag")


def _npz_header(npz, key):
    """(shape, dtype) of an array in an npz without reading it."""
    with npz.zip.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(f)
    return shape, dtype


def _describe_npz(path, size, options=None):
    """A user's npz in MedMNIST's layout, checked; task and names from <file>.json or inferred; groups
    from optional train_groups / val_groups / test_groups arrays (one id per image). Every label is
    checked against the task and names (_check_npz_labels)."""
    options = options or DataOptions()
    try:
        npz = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as an npz file ({e}); save it with numpy.savez")
    with npz:
        missing = [f"{s}_{k}" for s in SPLITS_3 for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; an npz needs train/val/test _images and _labels "
                            f"as in MedMNIST's files")
        labels, shapes = {}, set()
        for split in SPLITS_3:
            shape, dtype = _npz_header(npz, f"{split}_images")
            shapes.add(shape[1:])
            if dtype == object:
                raise UserError(f"{path}: {split}_images is an object array (a list of arrays); store one uint8 "
                                f"array per split, numpy.stack(images).astype(numpy.uint8), all images one size")
            if dtype != np.uint8:
                raise UserError(f"{path}: {split}_images is {dtype}, not uint8; convert it with "
                                f"numpy.clip(x, 0, 255).astype(numpy.uint8) (rescale first if needed)")
            if not (len(shape) == 3 or len(shape) == 4 and shape[3] == 3) or shape[1] != shape[2]:
                raise UserError(f"{path}: {split}_images has shape {shape}; expected (N, H, H) gray or "
                                f"(N, H, H, 3) RGB square images")
            if shape[1] != size:
                raise UserError(f"{path} holds {shape[1]} px images; pass --size {shape[1]}")
            if shape[0] < 2:
                raise UserError(f"{path}: {split} has {shape[0]} image(s); a split needs at least 2")
            label_shape, label_dtype = _npz_header(npz, f"{split}_labels")
            if label_dtype.kind not in "iub":
                what = "an object array" if label_dtype == object else f"{label_dtype}"
                fix = ("map each class name to its index and name the classes in a sidecar " + path + ".json"
                       if label_dtype.kind in "OUS" else "numpy.asarray(labels).astype(numpy.int64)")
                raise UserError(f"{path}: {split}_labels is {what}, not integers; store class indices, e.g. {fix}")
            if len(label_shape) != 2 or label_shape[0] != shape[0]:
                raise UserError(f"{path}: {split}_labels has shape {label_shape} for {shape[0]} images; expected "
                                f"({shape[0]}, 1) class indices or ({shape[0]}, L) 0/1, e.g. labels.reshape(-1, 1)")
            labels[split] = npz[f"{split}_labels"]
        if len(shapes) > 1:
            raise UserError(f"{path}: the splits' images differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                            f"store every split at the same size and channels")
        if len({labels[s].shape[1] for s in SPLITS_3}) > 1:
            raise UserError(f"{path}: the splits' labels differ in columns; every split needs the same label columns")
        channels = 3 if len(shape) == 4 else 1
        grouping = _npz_grouping(npz, path, {s: len(labels[s]) for s in SPLITS_3}, options)
    all_labels = np.concatenate(list(labels.values()))
    sidecar = next((p for p in (path + ".json", os.path.splitext(path)[0] + ".json") if os.path.isfile(p)), None)
    if sidecar:
        try:
            with open(sidecar) as f:
                info = json.load(f)
            task, names = info["task"], tuple(info["label"][k] for k in sorted(info["label"], key=int))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"cannot read {sidecar} ({type(e).__name__}: {e}); it needs medmnist INFO's keys "
                            f'task and label, e.g. {{"task": "binary-class", "label": {{"0": "a", "1": "b"}}}}')
        if task not in TASKS:
            raise UserError(f"{sidecar}: task {task!r} is not one of {', '.join(map(repr, TASKS))}")
        keys = sorted(map(int, info["label"]))
        if keys != list(range(len(keys))):
            raise UserError(f"{sidecar}: label keys {', '.join(map(str, keys))} are not 0..{len(keys) - 1}; key the "
                            f"names by class index from 0, with no gaps")
        if task == "binary-class" and len(names) != 2 or len(names) < 2:
            raise UserError(f"{sidecar}: task {task!r} with {len(names)} label name(s); a binary task names 2 classes, "
                            f"the others 2 or more")
        _check_npz_labels(path, labels, task, names, sidecar)
    else:
        _check_npz_labels(path, labels, None, None)
        if all_labels.shape[1] > 1:
            task, names = "multi-label, binary-class", tuple(str(i) for i in range(all_labels.shape[1]))
        else:
            n = int(all_labels.max()) + 1
            task, names = ("binary-class" if n == 2 else "multi-class"), tuple(str(i) for i in range(n))
        print(f"note: {path} has no {os.path.basename(path)}.json; inferred task {task!r} with "
              f"{len(names)} {'labels' if task.startswith('multi-label') else 'classes'} (write that file with "
              f"medmnist INFO's keys task and label to set them)", flush=True)
    # the file's contents, not its path or times: the same data moved or copied keeps its hash (resume,
    # compare.py), and a file replaced with the same size and time does not
    return DatasetInfo(path, "npz", task, names, channels, size, _md5(path)[:16], path, grouping)


def _first_bad(labels, bad):
    """(key, row, value) of the first label where the boolean arrays `bad` (one per split) hold."""
    for split in SPLITS_3:
        rows = np.flatnonzero(bad[split].any(axis=1))
        if len(rows):
            r = rows[0]
            return f"{split}_labels", int(r), labels[split][r].tolist()
    return None


def _check_npz_labels(path, labels, task, names, sidecar=None):
    """Refuses labels that do not fit the task and names (from the sidecar, or inferred when task is
    None): a negative index, one past the names (a 255 'ignore' stray), a multi-label cell other than
    0/1, label columns that do not match the names, integer labels with gaps when no sidecar names the
    classes. Each message names the key, the row and the fix."""
    columns = next(iter(labels.values())).shape[1]
    source = f"the {len(names)} names of {sidecar}" if sidecar else "them"
    write = f"or write {path}.json naming every class, e.g. " '{"task": "multi-class", "label": {"0": "a", ...}}'
    if task is None:  # no sidecar: what can be inferred must be consistent
        all_labels = np.concatenate(list(labels.values()))
        if columns > 1:
            where = _first_bad(labels, {s: ~np.isin(y, (0, 1)) for s, y in labels.items()})
            if where:
                raise UserError(f"{path}: {where[0]} row {where[1]} is {where[2]}; labels with {columns} columns are "
                                f"multi-label and take 0 or 1: fix those cells, or store class indices as (N, 1)")
            return
        where = _first_bad(labels, {s: y < 0 for s, y in labels.items()})
        if where:
            raise UserError(f"{path}: {where[0]} row {where[1]} is {where[2][0]}; class indices are 0..K-1: give the "
                            f"image its class or remove it")
        values = np.unique(all_labels).astype(np.int64)  # uint8: 255 + 1 must not wrap to 0
        if len(values) < 2:
            raise UserError(f"{path}: every label is {values[0]}; a classifier needs two or more classes")
        if len(values) != values[-1] + 1:
            counts = {int(v): int((all_labels == v).sum()) for v in values}
            stray = min(counts, key=lambda v: (counts[v], -v))
            key, row, _ = _first_bad(labels, {s: y == stray for s, y in labels.items()})
            raise UserError(f"{path}: the labels take the values {', '.join(map(str, counts))}, not 0..K-1; {key} row "
                            f"{row} is {stray} ({counts[stray]} image{'s' * (counts[stray] > 1)}, a stray ignore "
                            f"value?): fix those labels, {write}")
        return
    if task.startswith("multi-label"):
        if columns != len(names):
            raise UserError(f"{path}: the labels have {columns} column(s) but {sidecar} names {len(names)} labels; "
                            f"give one 0/1 column per name, or fix the names in {sidecar}")
        where = _first_bad(labels, {s: ~np.isin(y, (0, 1)) for s, y in labels.items()})
        if where:
            raise UserError(f"{path}: {where[0]} row {where[1]} is {where[2]}; multi-label cells take 0 or 1: fix "
                            f"those cells")
        return
    if columns != 1:
        raise UserError(f"{path}: the labels have {columns} columns but {sidecar} says {task!r}; store one class "
                        f"index per image, shape (N, 1), or set the task to 'multi-label, binary-class'")
    where = _first_bad(labels, {s: (y < 0) | (y >= len(names)) for s, y in labels.items()})
    if where:
        raise UserError(f"{path}: {where[0]} row {where[1]} is {where[2][0]}, outside the class indices "
                        f"0..{len(names) - 1} of {source}; fix that label (a stray 255 or -1: give the image its "
                        f"class or remove it), or name every class in {sidecar or path + '.json'}")


def _npz_grouping(npz, path, counts, options):
    """DatasetInfo.grouping of an npz from its *_groups arrays (None without them or with --group-column
    none); its splits are given, so one that puts a group in two splits is refused or warned about."""
    present = [f"{s}_groups" for s in SPLITS_3 if f"{s}_groups" in npz.files]
    if not present or (options.group_column or "").lower() == "none":
        return None
    if len(present) < 3:
        absent = [f"{s}_groups" for s in SPLITS_3 if f"{s}_groups" not in present]
        raise UserError(f"{path} has {', '.join(present)} but no {', '.join(absent)}; give every split its "
                        f"groups array (one group id per image) or none")
    groups, splits = [], []
    for split in SPLITS_3:
        try:
            g = npz[f"{split}_groups"]
        except ValueError:  # an object array: numpy will not load it without pickle
            g = None
        if g is None or g.ndim != 1 or len(g) != counts[split] or g.dtype.kind not in "iuUS":
            what = "an object array" if g is None else f"{g.dtype} of shape {g.shape}"
            raise UserError(f"{path}: {split}_groups is {what}; expected one integer or string group id per "
                            f"{split} image ({counts[split]}), e.g. numpy.asarray(ids, dtype=str)")
        groups += g.astype(str).tolist()
        splits += [split] * len(g)
    from common import convert
    n_leaking = convert.check_given_split(path, "groups (*_groups arrays)", groups, splits, options.allow_group_leak,
                                          "move each group's images into one split")
    return {"by": "npz", "groups": len(set(groups)), "groups_in_several_splits": n_leaking, "split": "given"}


SPLITS_3 = ("train", "val", "test")


def _unlabeled_error(info):
    return UserError(f"{info.source} holds unlabeled images (no class folders or label column): it can be "
                     f"pretrained on, but evaluation needs labels: put the images in one folder per class, or "
                     f"list them in a CSV with a label column")


# ---------------------------------------------------------------- splits, placed on the device
def load_split(flag, split, size=28, root=None, device="cpu", in_chans=3, options=None):
    """One split of one dataset (MedMNIST flag, npz, folder or CSV) as a Split on `device`, or in
    pinned host memory when it does not fit there (see place)."""
    options = options or DataOptions()
    info = describe(flag, size, root, options)
    if not info.labeled:
        raise _unlabeled_error(info)
    if in_chans == 1 and info.channels == 3:
        raise UserError(f"{flag} is RGB; --in-chans 1 needs gray images: use --in-chans 3")
    with np.load(info.path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    if info.kind != "medmnist":  # MedMNIST's splits hold every class
        _check_split_classes(info, split, labels)
    labels = torch.from_numpy(labels.astype(np.int64))
    if not info.task.startswith("multi-label"):
        labels = labels.reshape(-1)
    images = place(_nchw(images), device, options.host_memory, f"{flag} {split}")
    return Split(images, labels.to(device), flag, info.task, info.n_classes, info)


def split_files(info, split):
    """The file of each image of a split, in the split's order, as the conversion listed it: relative to
    the folder (or to a CSV manifest's folder). None for a MedMNIST flag or an npz, whose images have no
    files (their index in the split names them)."""
    if info.kind not in ("folder", "csv"):
        return None
    with np.load(info.path) as npz:
        files = json.loads(npz["meta"].tobytes()).get("files", {}).get(split)
    return None if files is None else [str(f) for f in files]


def _check_split_classes(info, split, labels):
    """Refuses a split whose scores would be undefined: val and test need every class (AUC is one-vs-rest
    per class; val's picks the epoch or probe), every label of a multi-label task both 0 and 1; train
    needs two classes to learn from."""
    names = info.class_names
    where = f"{info.source}'s {split} split ({len(labels)} images)"
    drawn = "; a drawn split: give it a larger share with --split-ratio, e.g. 70/15/15" if info.kind in (
        "folder", "csv") else ""
    if info.task.startswith("multi-label"):
        if split == "train":
            return
        positives = labels.sum(axis=0)
        flat = [j for j in range(len(names)) if positives[j] in (0, len(labels))]
        if flat:
            j = flat[0]
            value = int(positives[j] > 0)
            raise UserError(f"{where} has label {names[j]!r} = {value} in every image, so its AUC is undefined; add "
                            f"{split} images with {names[j]!r} = {1 - value}{drawn}, or leave that label out")
        return
    present = set(np.unique(labels).tolist())
    absent = [names[c] for c in range(len(names)) if c not in present]
    if split == "train" and len(present) < 2:
        raise UserError(f"{where} holds class {names[min(present)]!r} only; training needs images of two or more "
                        f"classes: add train images of {', '.join(map(repr, absent))}{drawn}")
    if split != "train" and absent:
        raise UserError(f"{where} has no images of class {', '.join(map(repr, absent))}, so its AUC is undefined; "
                        f"add {split} images of {'that class' if len(absent) == 1 else 'those classes'}{drawn}")


def _nchw(images):
    images = torch.from_numpy(images)
    return (images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)).contiguous()


def load_pretrain_images(flags, size=28, root=None, device="cpu", in_chans=3, options=None):
    """Train images (labels unused) of one or several sources, e.g. "pneumoniamnist,breastmnist" or
    "breastmnist,path/to/folder"; unlabeled folders and CSVs too. Only the train split:
    self-supervised pretraining must never see evaluation images."""
    options = options or DataOptions()
    parts, seen = [], {}
    for source in flags.split(","):  # each source once: a repeated one's images would be drawn twice as often
        if not source.strip():
            raise UserError(f"--data {flags}: an empty entry between commas; list the sources as a,b,c")
        key = source.strip() if source.strip() in FLAGS_2D else os.path.realpath(source.strip())
        if key in seen:
            raise UserError(f"--data {flags} lists one source twice ({seen[key]!r} and {source.strip()!r}); "
                            f"list each source once")
        seen[key] = source.strip()
    for source in flags.split(","):
        info = describe(source, size, root, options)
        if in_chans == 1 and info.channels == 3:
            raise UserError(f"{source.strip()} is RGB; --in-chans 1 needs gray images: use --in-chans 3")
        with np.load(info.path) as npz:
            parts.append(_nchw(npz["train_images"]))
    channels = max(p.shape[1] for p in parts)  # a gray + RGB union is held as RGB
    images = torch.cat([p.expand(-1, channels, -1, -1) for p in parts]) if len(parts) > 1 else parts[0]
    return place(images.contiguous(), device, options.host_memory, f"{flags} train")


def monitor_splits(data, size, root, device, in_chans, options=None):
    """Train and val splits of the first --data source, for a pretraining script's kNN monitor
    (--eval-every), or None when that source is unlabeled (a note says so)."""
    first = data.split(",")[0]
    info = describe(first, size, root, options)
    if not info.labeled:
        print(f"note: {first} is unlabeled; the kNN monitor (--eval-every) is off", flush=True)
        return None
    return [load_split(first, s, size, root, device, in_chans, options) for s in ("train", "val")]


# ---------------------------------------------------------------- data larger than the device
DEVICE_SHARE = 0.5  # a split may take this share of the GPU's free memory; the rest is the model's


def place(images, device, host_memory=False, what="images"):
    """`images` on `device`; on a GPU, kept in pinned host memory instead when `host_memory` is asked
    for or they take more than DEVICE_SHARE of its free memory. Batches then come from batch()."""
    device = torch.device(device)
    if device.type != "cuda":
        return images.to(device)
    gb = images.numel() / 1e9
    free = torch.cuda.mem_get_info(device)[0]
    if host_memory or images.numel() > DEVICE_SHARE * free:
        why = "--host-memory" if host_memory else f"more than half of the GPU's {free / 1e9:.1f} GB free"
        print(f"data: {what}: {len(images)} images ({gb:.2f} GB) in pinned host memory ({why}); each batch is "
              f"gathered on the host and copied to the GPU", flush=True)
        return images.pin_memory()
    print(f"data: {what}: {len(images)} images ({gb:.2f} GB) on {device}", flush=True)
    return images.to(device)


def batch(images, index, device):
    """images[index] on `device`, wherever `images` are held: an index slice on the device, or a
    gather on the host into pinned memory and a non-blocking copy (index: tensor, array or slice)."""
    device = torch.device(device)
    if images.device.type == device.type and (device.index is None or images.device.index == device.index):
        return images[index]
    if isinstance(index, slice):
        return images[index].to(device, non_blocking=True)
    index = torch.as_tensor(index).to("cpu")
    if index.dtype == torch.bool:
        index = index.nonzero().reshape(-1)
    out = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=images.is_pinned())
    torch.index_select(images, 0, index, out=out)
    return out.to(device, non_blocking=True)


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
