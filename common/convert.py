"""Users' own images (a folder or a CSV manifest) converted once into a MedMNIST-layout npz cache.

A source is listed (paths, labels, splits), hashed (file list, sizes, mtimes, conversion options),
and converted on every CPU core unless a cache file with that hash exists. Pixels: Pillow for
PNG / JPEG / TIFF / BMP (8- or 16-bit), pydicom for DICOM (docs/DATA.md, "DICOM")."""
import concurrent.futures
import csv
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.cli import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CACHE_VERSION = 1  # bump when the conversion's pixels would change
MULTI_LABEL = "multi-label, binary-class"


@dataclass
class Listing:
    """What a folder or CSV holds, before any pixel is read."""
    root: str            # folder the paths are relative to in the cache's records
    paths: list          # absolute image paths
    labels: np.ndarray   # (N,) class index, (N, L) 0/1, or None (unlabeled)
    splits: list         # "train" / "val" / "test" per image, or None: drawn (stratified, seeded)
    class_names: tuple
    task: str            # medmnist task string, or "unlabeled"
    stats: list          # (size, mtime_ns) per image


def task_for(n_classes):
    return "binary-class" if n_classes == 2 else "multi-class"


def _stat(paths):
    return [(s.st_size, s.st_mtime_ns) for s in map(os.stat, paths)]


def _is_image(entry):
    name = entry.name.lower()
    if name.startswith("."):
        return False
    if name.endswith(IMAGE_EXTS):
        return True
    if "." not in name:  # DICOM exports often have no extension: "DICM" at byte 128
        with open(entry.path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    return False


def _images_under(folder):
    """Image files anywhere under `folder`, sorted by path."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += sorted(e.path for e in os.scandir(dirpath) if e.is_file() and _is_image(e))
    return found


def _subdirs(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_folders(folder, classes=None):
    """Paths and label indices of `folder`/<class>/..., classes sorted by name (ImageFolder's order)."""
    names = _subdirs(folder)
    if classes is not None:
        for missing in sorted(set(classes) - set(names)):
            raise UserError(f"{folder} lacks class folder {missing!r} that train has; add {folder}/{missing}/ "
                            f"with its images, or move those images out of the other splits")
        for extra in sorted(set(names) - set(classes)):
            raise UserError(f"{folder} has class folder {extra!r} that train lacks; add train images of "
                            f"{extra!r} or remove {os.path.join(folder, extra)}")
    paths, labels = [], []
    for index, name in enumerate(names):
        found = _images_under(os.path.join(folder, name))
        if not found:
            raise UserError(f"class folder {os.path.join(folder, name)} holds no images ({', '.join(IMAGE_EXTS)}); "
                            f"add its images or remove the folder")
        paths += found
        labels += [index] * len(found)
    return paths, np.array(labels, dtype=np.int64), tuple(names)


def list_folder(folder):
    """DIR/{train,val,test}/<class>/..., DIR/<class>/... (split drawn later), or DIR/<image> (unlabeled)."""
    subdirs = _subdirs(folder)
    loose = [e.path for e in os.scandir(folder) if e.is_file() and _is_image(e)]
    split_dirs = [d for d in subdirs if d.lower() in SPLIT_ALIASES]
    if split_dirs:
        by_split = {SPLIT_ALIASES[d.lower()]: os.path.join(folder, d) for d in split_dirs}
        for split in SPLITS:
            if split not in by_split:
                raise UserError(f"{folder} has split folders but no {split}/; add {folder}/{split}/<class>/ "
                                f"images, or drop the split folders for an automatic split")
        paths, labels, splits, classes = [], [], [], None
        for split in SPLITS:
            if not _subdirs(by_split[split]):
                raise UserError(f"{by_split[split]} has no class folders; put its images in "
                                f"{by_split[split]}/<class>/")
            p, lab, names = _class_folders(by_split[split], classes)
            classes = classes or names
            paths, labels, splits = paths + p, labels + list(lab), splits + [split] * len(p)
        labels, listing_splits = np.array(labels, dtype=np.int64), splits
    elif subdirs:
        if loose:
            raise UserError(f"{folder} holds both class folders and {len(loose)} loose images (first: "
                            f"{os.path.basename(loose[0])}); move the images into class folders")
        paths, labels, classes = _class_folders(folder)
        listing_splits = None
    elif loose:
        paths = sorted(loose)
        return Listing(folder, paths, None, ["train"] * len(paths), (), "unlabeled", _stat(paths))
    else:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)}); point --data at the folder of "
                        f"images, of class folders, or of train/val/test folders")
    if len(classes) < 2:
        raise UserError(f"{folder} has a single class ({classes[0]!r}); a classifier needs two or more class "
                        f"folders (for unlabeled pretraining, put the images directly in one folder)")
    return Listing(folder, paths, labels, listing_splits, classes, task_for(len(classes)), _stat(paths))


def _column(fields, name):
    """The CSV column called `name`, any case (CheXpert writes "Path")."""
    return next((f for f in fields if f.strip().lower() == name), None)


def _binary(value, policy, where):
    """A multi-label cell: 1 / 0, blank and -1 (uncertain) as the policies say."""
    text = value.strip()
    try:
        number = float(text) if text else None
    except ValueError:
        number = "bad"
    if number in (0, 1):
        return int(number)
    kind = {None: "blank", -1: "uncertain"}.get(number)
    if kind is None:
        raise UserError(f"{where} holds {value!r}; multi-label columns take 0 or 1 (blank and -1 = uncertain "
                        f"are set by --blank-label and --uncertain-label)")
    if policy[kind] == "error":
        flag = "--blank-label" if kind == "blank" else "--uncertain-label"
        raise UserError(f"{where} is {kind} ({value!r}); choose what it means with {flag} zero or one")
    return 1 if policy[kind] == "one" else 0


def list_csv(path, label_columns=(), uncertain="error", blank="zero"):
    """Rows of a CSV manifest: `path` (relative to the CSV's folder, or absolute), `label` or the 0/1
    `label_columns`, optional `split`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read CSV {path}: {e}; save it as UTF-8 text with a header row")
    path_col, label_col, split_col = (_column(fields, n) for n in ("path", "label", "split"))
    if path_col is None:
        raise UserError(f"{path} has no 'path' column (columns: {', '.join(fields) or 'none'}); add a header "
                        f"row with a path column of image files")
    if not rows:
        raise UserError(f"{path} lists no images; add rows below its header")
    here = os.path.dirname(os.path.abspath(path))
    paths = [os.path.normpath(os.path.join(here, r[path_col].strip())) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{path} lists {len(missing)} files that do not exist (first: {', '.join(missing[:3])}); "
                        f"fix the paths (relative to the CSV's folder, or absolute)")
    if label_columns:
        absent = [c for c in label_columns if c not in fields]
        if absent:
            raise UserError(f"--label-columns names {', '.join(map(repr, absent))}, absent from {path} "
                            f"(columns: {', '.join(fields)})")
        policy = {"uncertain": uncertain, "blank": blank}
        labels = np.array([[_binary(r[c], policy, f"{path} row {i + 2} column {c!r}") for c in label_columns]
                           for i, r in enumerate(rows)], dtype=np.int64)
        classes, task = tuple(label_columns), MULTI_LABEL
    elif label_col is not None:
        values = [r[label_col].strip() for r in rows]
        if "" in values:
            raise UserError(f"{path} row {values.index('') + 2} has no label; fill it in or remove the row")
        ints = all(v.lstrip("-").isdigit() for v in values)
        names = sorted(set(values), key=int if ints else str)
        if ints and [int(v) for v in names] == list(range(len(names))):
            index = {v: int(v) for v in names}  # class indices as written
        else:
            index = {v: i for i, v in enumerate(names)}
        labels = np.array([index[v] for v in values], dtype=np.int64)
        classes, task = tuple(names), task_for(len(names))
        if len(names) < 2:
            raise UserError(f"{path} has a single label {names[0]!r}; a classifier needs two or more classes")
    else:
        labels, classes, task = None, (), "unlabeled"
    splits = None
    if labels is None:
        splits = ["train"] * len(rows)
    elif split_col is not None:
        splits = []
        for i, r in enumerate(rows):
            value = r[split_col].strip().lower()
            if value not in SPLIT_ALIASES:
                raise UserError(f"{path} row {i + 2} has split {r[split_col]!r}; use train, val or test")
            splits.append(SPLIT_ALIASES[value])
    return Listing(here, paths, labels, splits, classes, task, _stat(paths))


def draw_splits(listing, ratio, seed, previous):
    """Seeded train/val/test per image, stratified by class for single labels; images already in
    `previous` (relative path -> split, from the stored split file) keep their split."""
    rel = [os.path.relpath(p, listing.root) for p in listing.paths]
    splits = [previous.get(r) for r in rel]
    new = np.array([i for i, s in enumerate(splits) if s is None], dtype=np.int64)
    groups = [new] if listing.labels.ndim > 1 else [new[listing.labels[new] == c] for c in np.unique(listing.labels)]
    rng = np.random.default_rng(seed)
    for group in groups:
        group = rng.permutation(group)
        n_val, n_test = round(ratio[1] * len(group)), round(ratio[2] * len(group))
        for k, i in enumerate(group):
            splits[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return splits, dict(zip(rel, splits))


# ---------------------------------------------------------------- pixels
def _scale(x):
    """Any-range intensities -> uint8 over the image's own range (no window given)."""
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    return np.zeros(x.shape, np.uint8) if hi <= lo else np.round((x - lo) * (255 / (hi - lo))).astype(np.uint8)


def _read_dicom(path):
    import pydicom
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds = pydicom.dcmread(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame DICOM; export its frames as single images")
    raw = ds.pixel_array
    if ds.get("SamplesPerPixel", 1) == 3:  # colour: pydicom has converted YBR to RGB
        return raw if raw.dtype == np.uint8 else _scale(raw)
    x = apply_modality_lut(raw, ds)  # rescale slope / intercept, or the modality LUT
    if "VOILUTSequence" in ds:
        x = apply_voi_lut(x, ds, prefer_lut=True)
        out = 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
        x = np.clip(np.round(x * (255 / out)), 0, 255).astype(np.uint8)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, MultiValue) else v)
        # the window's linear function (DICOM PS3.3 C.11.2.1.2.1), to 0..255
        c, w = first(ds.WindowCenter) - 0.5, max(first(ds.WindowWidth) - 1, 1e-6)
        x = np.clip(np.round(((x - c) / w + 0.5) * 255), 0, 255).astype(np.uint8)
    elif raw.dtype == np.uint8 and x.dtype == np.uint8:
        x = raw
    else:
        x = _scale(x)
    return 255 - x if ds.get("PhotometricInterpretation") == "MONOCHROME1" else x


def _open(path, size):
    """Image -> uint8 (H, W) gray or (H, W, 3) RGB."""
    if path.lower().endswith((".dcm", ".dicom")) or "." not in os.path.basename(path):
        return _read_dicom(path)
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (2 * size, 2 * size))  # decode big JPEGs at a reduced scale: faster, still >= 2x
        if img.mode in ("L", "RGB"):
            return np.asarray(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit gray
            return _scale(np.asarray(img))
        if img.mode in ("1", "LA", "La"):
            return np.asarray(img.convert("L"))
        return np.asarray(img.convert("RGB"))  # palette, RGBA, CMYK, YCbCr: alpha dropped


def fit(x, size, crop):
    """uint8 (H, W[, 3]) -> (size, size[, 3]): square by centre crop, zero pad or stretch, then an
    antialiased bicubic resize (Pillow filters over the whole source footprint when shrinking)."""
    h, w = x.shape[:2]
    if h != w and crop == "center":
        s = min(h, w)
        x = x[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    elif h != w and crop == "pad":
        s = max(h, w)
        padded = np.zeros((s, s) + x.shape[2:], np.uint8)
        padded[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = x
        x = padded
    if x.shape[:2] != (size, size):
        x = np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((size, size), Image.Resampling.BICUBIC))
    return x


def convert_one(path, size, crop):
    """One file -> (array, None), or (None, reason) when it cannot be read."""
    try:
        x = _open(path, size)
        if x.ndim == 3 and x.shape[2] == 4:
            x = x[..., :3]
        if x.ndim == 3 and (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all():
            x = x[..., 0]  # an RGB file of a gray image is gray
        if x.ndim != 2 and not (x.ndim == 3 and x.shape[2] == 3):
            raise ValueError(f"unexpected pixel array shape {x.shape}")
        return fit(x, size, crop), None
    except UserError:
        raise
    except Exception as e:  # Pillow and pydicom raise many types for a bad file
        return None, f"{type(e).__name__}: {e}".replace("\n", " ")


def _convert_chunk(paths, size, crop):
    return [convert_one(p, size, crop) for p in paths]


def workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert_images(paths, size, crop, desc="converting", processes=None):
    """uint8 (N, size, size), or (N, size, size, 3) when some image is RGB (the gray ones repeated);
    returns (images, number of gray images)."""
    from tqdm import tqdm
    processes = processes or workers()
    out = np.zeros((len(paths), size, size), np.uint8)
    chunk = 64
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    pool = None
    if processes > 1 and len(paths) > 2 * chunk:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=context)
        results = pool.map(_convert_chunk, chunks, [size] * len(chunks), [crop] * len(chunks))
    else:
        results = (_convert_chunk(c, size, crop) for c in chunks)
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", mininterval=1, disable=None) as bar:
            i = n_gray = 0
            for part in results:
                for x, error in part:
                    if error:
                        raise UserError(f"cannot read image {paths[i]} ({error}); replace or remove the file")
                    if x.ndim == 3 and out.ndim == 3:  # first RGB image: hold everything as RGB
                        out = np.repeat(out[..., None], 3, axis=3)
                    out[i] = x if x.ndim == out.ndim - 1 else x[..., None]
                    n_gray += x.ndim == 2
                    i += 1
                bar.update(len(part))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return out, n_gray


# ---------------------------------------------------------------- cache
def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def cache_folder(source, cache_dir=None):
    folder = cache_dir or os.environ.get("MEDSSL_CACHE") or os.path.join(os.path.dirname(source), ".medssl-cache")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {folder} ({e.strerror}); choose a writable one with "
                        f"--cache-dir or $MEDSSL_CACHE")
    return folder


def cached_npz(source, size, options):
    """Path and meta of the npz cache of a folder or CSV `source`, converting when none matches."""
    source = os.path.abspath(source)
    if os.path.isdir(source):
        listing = list_folder(source)
    else:
        listing = list_csv(source, options.label_columns, options.uncertain, options.blank)
    folder = cache_folder(source, options.cache_dir)
    base = os.path.splitext(os.path.basename(source.rstrip(os.sep)))[0] + "-" + _digest(source)[:6]
    split_file = os.path.join(folder, f"{base}-split-{'-'.join(str(round(100 * r)) for r in options.split_ratio)}.csv")
    stored, drawn = {}, listing.splits is None
    if drawn:
        if os.path.isfile(split_file):
            with open(split_file, newline="") as f:
                stored = {r["path"]: r["split"] for r in csv.DictReader(f)}
        listing.splits, new_stored = draw_splits(listing, options.split_ratio, options.split_seed, stored)
    rel = [os.path.relpath(p, listing.root) for p in listing.paths]
    csv_bytes = b"" if os.path.isdir(source) else open(source, "rb").read()
    key = _digest(CACHE_VERSION, size, options.crop, rel, listing.stats, listing.splits, csv_bytes,
                  listing.labels.tolist() if listing.labels is not None else None, listing.class_names)
    path = os.path.join(folder, f"{base}-{size}px-{options.crop}-{key[:16]}.npz")
    if os.path.isfile(path):
        with np.load(path) as npz:
            return path, json.loads(npz["meta"].tobytes())
    for split in (SPLITS if listing.labels is not None else ("train",)):
        n = listing.splits.count(split)
        if n < 2:
            raise UserError(f"{source} gives {n} {split} image(s); a split needs at least 2: add images"
                            + (" or change --split-ratio" if drawn else ""))
    start = time.time()
    print(f"data: converting {len(rel)} images of {source} to {size} px ({options.crop} crop) with "
          f"{workers()} processes into {path}", flush=True)
    images, n_gray = convert_images(listing.paths, size, options.crop)
    channels = 3 if images.ndim == 4 else 1
    if channels == 3 and n_gray:
        print(f"note: {source} mixes {n_gray} gray and {len(images) - n_gray} RGB images; all are held as "
              f"RGB (gray repeated to 3 channels)", flush=True)
    meta = {"source": source, "task": listing.task, "class_names": list(listing.class_names),
            "channels": channels, "size": size, "hash": key, "files": {}}
    arrays = {}
    order = np.array(listing.splits)
    for split in (SPLITS if listing.labels is not None else ("train",)):
        idx = np.flatnonzero(order == split)
        arrays[f"{split}_images"] = images[idx]
        if listing.labels is not None:
            labels = listing.labels[idx]
            arrays[f"{split}_labels"] = (labels if labels.ndim == 2 else labels[:, None]).astype(
                np.uint8 if len(listing.class_names) <= 256 else np.int64)
        meta["files"][split] = [rel[i] for i in idx]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    if drawn and stored != new_stored:  # the drawn split, kept so that it never changes under the user
        with open(split_file + ".tmp", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "split"])
            w.writerows(new_stored.items())
        os.replace(split_file + ".tmp", split_file)
    for old in os.listdir(folder):  # an older conversion of this source at this size and crop
        superseded = old.startswith(f"{base}-{size}px-{options.crop}-") and old.endswith(".npz")
        if superseded and old != os.path.basename(path):
            os.remove(os.path.join(folder, old))
    took = time.time() - start
    print(f"data: converted in {took:.1f} s ({len(images) / max(took, 1e-9):.0f} images/s)", flush=True)
    return path, meta
