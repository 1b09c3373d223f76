"""Users' own images (a folder or a CSV manifest) converted once into a MedMNIST-layout npz cache.

A source is listed (paths, labels, splits), hashed (file list, sizes, mtimes, contents, conversion
options), and converted on every CPU core unless a cache file with that hash exists. Pixels: Pillow for
PNG / JPEG / TIFF / BMP / WebP / GIF / JPEG 2000 / Netpbm (8- to 32-bit, float), pydicom for DICOM,
each read as a viewer shows it (docs/DATA.md, "Images" and "DICOM")."""
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import signal
import re
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from common.errors import UserError

# read through Pillow, or pydicom for DICOM (which is also recognised by content, under any name)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2", ".j2k",
              ".pgm", ".ppm", ".pbm", ".pnm", ".dcm", ".dicom")
DICOM_EXTS = (".dcm", ".dicom")
IMAGE_KINDS = f"{' '.join(IMAGE_EXTS)}, or DICOM under any name"
SPLITS = ("train", "val", "test")
# split folder names (any case) and split column values: train/val/test, and public datasets' spellings
# (Kaggle's Training/ and Testing/, valid/, validation/)
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
CACHE_VERSION = 2  # bump when the conversion's pixels would change
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
    groups: list = None  # group (patient) id per image as a string, or None: every image on its own
    group_by: str = None  # where the groups come from: the CSV column's name, or "folder"


def task_for(n_classes):
    return "binary-class" if n_classes == 2 else "multi-class"


def _stat(paths):
    return [(s.st_size, s.st_mtime_ns) for s in map(os.stat, paths)]


def _is_dicom(path):
    """DICOM by content: "DICM" after the 128-byte preamble (PS3.10 section 7.1), whatever the file's name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_image(entry):
    """An image by its extension (IMAGE_EXTS), or DICOM by its content: PACS exports name files by UID
    (1.2.840.113619.2.55...), IMG0001.IMA and the like."""
    name = entry.name.lower()
    if name.startswith("."):
        return False
    return name.endswith(IMAGE_EXTS) or _is_dicom(entry.path)


class Skipped:
    """What a folder listing passes over, by reason, so that nothing is left out silently: one note line
    per reason, with the count and the first path."""
    NOT_IMAGE = ("file that is neither an image nor DICOM", "files that are neither images nor DICOM")
    HIDDEN = ("hidden file or folder (name starting with '.')", "hidden files or folders (names starting with '.')")
    BROKEN = ("broken link (to nothing)", "broken links (to nothing)")
    LOOP = ("folder link back to a folder that holds it (a loop)", "folder links back to a folder that holds them "
            "(loops)")
    REPEAT = ("folder reached a second time through a link (its images are taken once)",
              "folders reached a second time through links (their images are taken once)")
    UNREADABLE = ("folder that cannot be opened", "folders that cannot be opened")
    DICOMDIR = ("DICOMDIR index file (no pixels)", "DICOMDIR index files (no pixels)")
    BESIDE_SPLITS = ("folder beside the split folders", "folders beside the split folders")

    def __init__(self):
        self.paths = {}

    def add(self, reason, path):
        self.paths.setdefault(reason, []).append(path)

    def lines(self, under=None):
        """One phrase per reason ("3 files that are neither ... (.txt 2, .csv 1), first: ..."), counting
        only the paths inside folder `under` when it is given."""
        out = []
        for reason, paths in self.paths.items():
            paths = [p for p in paths if under is None or p == under or p.startswith(os.path.join(under, ""))]
            if not paths:
                continue
            kinds = ""
            if reason is self.NOT_IMAGE:
                tally = {}
                for p in paths:
                    ext = os.path.splitext(p)[1].lower() or "no extension"
                    tally[ext] = tally.get(ext, 0) + 1
                kinds = " (" + ", ".join(f"{e} {n}" for e, n in sorted(tally.items(), key=lambda t: -t[1])[:4]) + ")"
            out.append(f"{len(paths)} {reason[len(paths) > 1]}{kinds}, first: {paths[0]}")
        return out

    def report(self, source):
        for line in self.lines():
            print(f"note: {source}: skipped {line}", flush=True)

    def why(self, under=None):
        """What was skipped, to append to a "holds no images" refusal."""
        lines = self.lines(under)
        return f"; skipped {'; '.join(lines)}" if lines else ""


def _inside(outer, inner):
    """Whether real path `inner` is `outer` or lies below it."""
    return inner == outer or inner.startswith(os.path.join(outer, ""))


def _scan(folder, skipped, recursive):
    """Image files in `folder` (and below it when `recursive`), in os.walk's top-down order with names
    sorted; every other entry is recorded in `skipped`. Links to files and folders are followed, but a
    folder link back to a folder that holds it (a loop), or to a folder already walked, is not: the real
    path of every folder walked is kept, so nothing is listed twice."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    top = os.path.realpath(folder)
    if os.path.islink(folder.rstrip(os.sep)) and _inside(top, parent):
        skipped.add(Skipped.LOOP, folder)
        return []
    found, walked, stack = [], set(), [(folder, top)]
    while stack:
        path, real = stack.pop()
        if real in walked:
            skipped.add(Skipped.REPEAT, path)
            continue
        walked.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            skipped.add(Skipped.UNREADABLE, path)
            continue
        below = []
        for e in entries:
            try:
                is_dir, is_file, is_link = e.is_dir(), e.is_file(), e.is_symlink()  # dir / file: through links
            except OSError:
                is_dir = is_file = False
                is_link = True
            if e.name.startswith("."):
                skipped.add(Skipped.HIDDEN, e.path)
            elif is_dir:
                if recursive:
                    sub = os.path.realpath(e.path) if is_link else os.path.join(real, e.name)
                    if is_link and _inside(sub, real):
                        skipped.add(Skipped.LOOP, e.path)
                    else:
                        below.append((e.path, sub))
            elif is_file:
                if e.name == "DICOMDIR":  # a PACS export's index of its files: DICOM, but no image
                    skipped.add(Skipped.DICOMDIR, e.path)
                elif _is_image(e):
                    found.append(e.path)
                else:
                    skipped.add(Skipped.NOT_IMAGE, e.path)
            elif is_link:
                skipped.add(Skipped.BROKEN, e.path)
            else:  # a pipe, socket or device
                skipped.add(Skipped.NOT_IMAGE, e.path)
        stack += reversed(below)  # the first sub-folder is walked next, as os.walk does
    return found


def _images_under(folder, skipped=None):
    """Image files anywhere under `folder`, in os.walk's top-down order with names sorted (links followed,
    see _scan). What it passes over goes into `skipped`; without one, a note is printed here."""
    own = Skipped() if skipped is None else skipped
    found = _scan(folder, own, recursive=True)
    if skipped is None:
        own.report(folder)
    return found


def _loose_images(folder, skipped=None):
    """Image files directly in `folder` (its sub-folders are class or split folders), sorted by name;
    the other files go into `skipped` (a note printed here when None)."""
    own = Skipped() if skipped is None else skipped
    found = _scan(folder, own, recursive=False)
    if skipped is None:
        own.report(folder)
    return found


def _subdirs(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_folders(folder, classes=None, skipped=None):
    """Paths, label indices and group folders of `folder`/<class>/..., classes sorted by name
    (ImageFolder's order); an image's group folder is the first folder below its class folder, None
    for an image directly in it."""
    names = _subdirs(folder)
    if classes is not None:
        for missing in sorted(set(classes) - set(names)):
            raise UserError(f"{folder} lacks class folder {missing!r} that train has; add {folder}/{missing}/ "
                            f"with its images, or move those images out of the other splits")
        for extra in sorted(set(names) - set(classes)):
            raise UserError(f"{folder} has class folder {extra!r} that train lacks; add train images of "
                            f"{extra!r} or remove {os.path.join(folder, extra)}")
    paths, labels, groups = [], [], []
    for index, name in enumerate(names):
        found = _images_under(os.path.join(folder, name), skipped)
        if not found:
            why = skipped.why(os.path.join(folder, name)) if skipped else ""
            raise UserError(f"class folder {os.path.join(folder, name)} holds no images ({IMAGE_KINDS}){why}; "
                            f"add its images or remove the folder")
        paths += found
        labels += [index] * len(found)
        below = (os.path.relpath(p, os.path.join(folder, name)).split(os.sep) for p in found)
        groups += [parts[0] if len(parts) > 1 else None for parts in below]
    return paths, np.array(labels, dtype=np.int64), tuple(names), groups


def _split_folders(folder, names):
    """{split: folder} of the split folders `names` (SPLIT_ALIASES, any case); refuses two folders of one
    split and a missing one, naming the layout to use."""
    by_split = {}
    for name in names:
        split = SPLIT_ALIASES[name.lower()]
        if split in by_split:
            raise UserError(f"{folder} has two {split} folders, {os.path.basename(by_split[split])}/ and {name}/; "
                            f"merge them into one")
        by_split[split] = os.path.join(folder, name)
    missing = [s for s in SPLITS if s not in by_split]
    if missing:
        given = " and ".join(f"{os.path.basename(by_split[s])}/" for s in SPLITS if s in by_split)
        how = (f"move some training images (e.g. a tenth of each class) into {folder}/{missing[0]}/<class>/"
               if "train" in by_split else f"add {folder}/train/<class>/ images")
        raise UserError(f"{folder} has split folders {given} but no {' or '.join(f'{s}/' for s in missing)} "
                        f"(split folders are train/, val/ and test/, each holding the class folders); {how}, or "
                        f"put the class folders directly in {folder} for a drawn train/val/test split (--split-ratio)")
    return by_split


def list_folder(folder, group_column=None):
    """DIR/{train,val,test}/<class>/... (split folders in any case and SPLIT_ALIASES' spellings, e.g.
    Training/ and Testing/), DIR/<class>/... (split drawn later), or DIR/<image> (unlabeled).
    group_column "folder": each image's group is the folder below its class folder, DIR/[<split>/]<class>/
    <group>/...; None or "none": no groups."""
    if group_column is not None and group_column.lower() not in ("folder", "none"):
        raise UserError(f"--group-column {group_column}: a folder of images has no columns; pass --group-column "
                        f"folder to group by DIR/<class>/<group>/ folders, or list the images in a CSV manifest")
    by_folder = group_column is not None and group_column.lower() == "folder"
    subdirs = _subdirs(folder)
    skipped = Skipped()  # what the listing passes over, noted in one line per reason
    loose = _loose_images(folder, skipped)
    split_dirs = [d for d in subdirs if d.lower() in SPLIT_ALIASES]
    if not split_dirs and not loose and len(subdirs) == 1:
        inner = os.path.join(folder, subdirs[0])
        if any(d.lower() in SPLIT_ALIASES for d in _subdirs(inner)):  # an archive's top folder
            raise UserError(f"{folder} holds only {subdirs[0]}/, which holds split folders; point --data at {inner}")
    if split_dirs:
        by_split = _split_folders(folder, split_dirs)
        if loose:
            raise UserError(f"{folder} holds both split folders and {len(loose)} loose images (first: "
                            f"{os.path.basename(loose[0])}); move the images into {folder}/<split>/<class>/")
        for d in subdirs:
            if os.path.join(folder, d) not in by_split.values():
                skipped.add(Skipped.BESIDE_SPLITS, os.path.join(folder, d))
        paths, labels, splits, groups, classes = [], [], [], [], None
        for split in SPLITS:
            if not _subdirs(by_split[split]):
                raise UserError(f"{by_split[split]} has no class folders; put its images in "
                                f"{by_split[split]}/<class>/")
            stray = _loose_images(by_split[split], skipped)
            if stray:
                raise UserError(f"{by_split[split]} holds both class folders and {len(stray)} loose images (first: "
                                f"{os.path.basename(stray[0])}); move the images into class folders")
            p, lab, names, g = _class_folders(by_split[split], classes, skipped)
            classes = classes or names
            paths, labels, splits, groups = paths + p, labels + list(lab), splits + [split] * len(p), groups + g
        labels, listing_splits = np.array(labels, dtype=np.int64), splits
    elif subdirs:
        if loose:
            raise UserError(f"{folder} holds both class folders and {len(loose)} loose images (first: "
                            f"{os.path.basename(loose[0])}); move the images into class folders")
        paths, labels, classes, groups = _class_folders(folder, skipped=skipped)
        listing_splits = None
    elif loose:
        skipped.report(folder)
        paths = sorted(loose)
        return Listing(folder, paths, None, ["train"] * len(paths), (), "unlabeled", _stat(paths))
    else:
        raise UserError(f"{folder} holds no images ({IMAGE_KINDS}){skipped.why()}; point --data at the folder "
                        f"of images, of class folders, or of train/val/test folders")
    skipped.report(folder)
    if len(classes) < 2:
        raise UserError(f"{folder} has a single class ({classes[0]!r}); a classifier needs two or more class "
                        f"folders (for unlabeled pretraining, put the images directly in one folder)")
    listing = Listing(folder, paths, labels, listing_splits, classes, task_for(len(classes)), _stat(paths))
    if by_folder:
        if None in groups:
            loose_one = paths[groups.index(None)]
            raise UserError(f"--group-column folder: {loose_one} sits directly in its class folder; put every "
                            f"image in a group folder, <class>/<group>/ (one per patient), or drop --group-column")
        listing.groups, listing.group_by = groups, "folder"
    elif None not in groups and group_column is None:
        print(f"note: every image of {folder} sits in a sub-folder of its class folder; if each sub-folder holds "
              f"one patient, pass --group-column folder so that no patient lands in two splits", flush=True)
    return listing


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


GROUP_COLUMNS = ("patient_id", "patient", "subject_id", "subject", "group")  # read as groups unless told
DELIMITERS = ",;\t|"  # a manifest's cell separator, sniffed: Excel in many locales writes ';'


def _read_manifest(path):
    """(header, rows, line numbers) of a CSV manifest: header cells stripped of spaces, each row a dict
    of its cells, blank lines skipped. The delimiter (one of DELIMITERS) is sniffed by csv.Sniffer from
    the first lines; a sniff that finds no 'path' column falls back to the delimiter that does."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read CSV {path} ({type(e).__name__}: {e}); save it as UTF-8 text with a header row")
    lines = text.splitlines(keepends=True)
    try:
        first = csv.Sniffer().sniff("".join(lines[:20]), delimiters=DELIMITERS).delimiter
    except csv.Error:
        first = ","
    header_line = next((line for line in lines if line.strip()), "")
    for delimiter in dict.fromkeys(first + DELIMITERS):
        header = [c.strip() for c in next(csv.reader([header_line], delimiter=delimiter), [])]
        if _column(header, "path") is not None:
            break
    else:
        delimiter = first
    reader = csv.reader(lines, delimiter=delimiter)
    header, rows, numbers, last = None, [], [], 0
    try:
        for cells in reader:
            start, last = last + 1, reader.line_num
            if any("\n" in c or "\r" in c for c in cells):  # no path or label holds a line break
                raise UserError(f"{path} row {start} opens a double quote that no cell closes (it runs to row "
                                f"{reader.line_num}); close the quote or remove it")
            if not any(c.strip() for c in cells):
                continue  # a blank line
            if header is None:
                header = [c.strip() for c in cells]
                named = [h for h in header if h]
                twice = next((h for h in named if named.count(h) > 1), None)
                if twice:
                    raise UserError(f"{path}: the header names column {twice!r} twice; rename one of them")
                continue
            if len(cells) < len(header) or any(c.strip() for c in cells[len(header):]):
                shown = "tab" if delimiter == "\t" else repr(delimiter)
                fix = ("fill in the missing cells or remove the row" if len(cells) < len(header) else
                       "remove the extra cells")
                raise UserError(f"{path} row {reader.line_num} has {len(cells)} cell{'s' * (len(cells) != 1)} but "
                                f"the header has {len(header)} ({', '.join(header)}; separated by {shown}); {fix} (a "
                                f"cell holding {shown} needs double quotes)")
            rows.append(dict(zip(header, cells)))
            numbers.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"cannot read CSV {path} at row {reader.line_num} ({e}); fix the quoting on that row")
    return header or [], rows, numbers


def _manifest_path(here, cell):
    """A manifest's path cell as an absolute path: relative to the CSV's folder, or absolute. A Windows
    path (a\\b.png) is read with '/' when the file exists that way and not as written."""
    path = os.path.normpath(os.path.join(here, cell))
    if os.sep == "/" and "\\" in cell and not os.path.exists(path):
        posix = os.path.normpath(os.path.join(here, cell.replace("\\", "/")))
        if os.path.exists(posix):
            return posix
    return path


def _duplicates(path, paths, numbers, label_cells, split_cells):
    """Refuses an image listed on two rows (the same file, whatever the path's spelling): with two labels
    it has no label, in two splits it is a test or val image seen in training, and even alike it counts
    twice."""
    rows_of = {}
    for i, p in enumerate(paths):
        rows_of.setdefault(os.path.realpath(p), []).append(i)
    repeated = [idx for idx in rows_of.values() if len(idx) > 1]
    if not repeated:
        return
    idx = (next((i for i in repeated if len({split_cells[j] for j in i}) > 1), None)
           or next((i for i in repeated if len({label_cells[j] for j in i}) > 1), repeated[0]))
    rows = " and ".join(str(numbers[j]) for j in idx[:2]) + (f" (and {len(idx) - 2} more)" if len(idx) > 2 else "")
    first = f"{len(repeated)} images are listed on more than one row; first: " if len(repeated) > 1 else ""
    if len({split_cells[j] for j in idx}) > 1:
        where = " and ".join(dict.fromkeys(split_cells[j] for j in idx))
        raise UserError(f"{path}: {first}{paths[idx[0]]} is in {where} (rows {rows}): an image seen in training "
                        f"scores optimistically; keep each image on one row, in one split")
    if len({label_cells[j] for j in idx}) > 1:
        labels = " and ".join(repr(label_cells[j]) for j in idx[:2])
        raise UserError(f"{path}: {first}{paths[idx[0]]} has labels {labels} (rows {rows}); keep one row per image "
                        f"with its right label (several labels per image: --label-columns with 0/1 columns)")
    raise UserError(f"{path}: {first}{paths[idx[0]]} is listed twice (rows {rows}); remove the repeated rows")


def _integer_labels(path, values, numbers):
    """Refuses integer labels that cannot be class indices: negative ones, and gaps (0, 1 and 255: a
    stray ignore or mask value would become a class of its own)."""
    ints = sorted({int(v) for v in values})
    if ints[0] < 0:
        row = numbers[next(i for i, v in enumerate(values) if int(v) < 0)]
        raise UserError(f"{path} row {row} has label {ints[0]}; integer labels are class indices 0..K-1 (or write "
                        f"class names): give the row its class or remove it")
    if ints[-1] - ints[0] + 1 != len(ints):
        counts = {k: sum(int(v) == k for v in values) for k in ints}
        stray = min(ints, key=lambda k: (counts[k], -k))
        row = numbers[next(i for i, v in enumerate(values) if int(v) == stray)]
        raise UserError(f"{path}: the integer labels are {', '.join(map(str, ints))}, not consecutive class indices; "
                        f"row {row} has {stray} ({counts[stray]} row{'s' * (counts[stray] > 1)}): fix or remove "
                        f"those rows, or write class names instead of numbers")


def list_csv(path, label_columns=(), uncertain="error", blank="zero", group_column=None):
    """Rows of a CSV manifest: `path` (relative to the CSV's folder, or absolute; Windows separators
    read too), `label` or the 0/1 `label_columns`, optional `split`, optional group (patient) column:
    `group_column`, or when None the first of GROUP_COLUMNS present (a note says so); "none": no groups.
    Cells are separated by , ; tab or | (sniffed); an image on two rows is refused."""
    fields, rows, numbers = _read_manifest(path)
    path_col, label_col, split_col = (_column(fields, n) for n in ("path", "label", "split"))
    if path_col is None:
        raise UserError(f"{path} has no 'path' column (columns: {', '.join(fields) or 'none'}); add a header "
                        f"row with a path column of image files")
    if not rows:
        raise UserError(f"{path} lists no images; add rows below its header")
    here = os.path.dirname(os.path.abspath(path))
    cells = [r[path_col].strip() for r in rows]
    if "" in cells:
        raise UserError(f"{path} row {numbers[cells.index('')]} has no path; fill it in or remove the row")
    paths = [_manifest_path(here, c) for c in cells]
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(f"row {numbers[i]} {paths[i]}" for i in missing[:3])
        windows = any(re.match(r"^[A-Za-z]:[\\/]|^\\\\", cells[i]) for i in missing)
        fix = ("they are Windows paths: write them relative to the CSV's folder, e.g. images/0001.png" if windows else
               "fix the paths (relative to the CSV's folder, or absolute)")
        raise UserError(f"{path} lists {len(missing)} files that do not exist (first: {shown}); {fix}")
    label_cells = ([tuple(r[c].strip() for c in label_columns if c in r) for r in rows] if label_columns else
                   [r[label_col].strip() if label_col else "" for r in rows])
    _duplicates(path, paths, numbers, label_cells,
                [SPLIT_ALIASES.get(r[split_col].strip().lower(), r[split_col].strip()) if split_col else ""
                 for r in rows])
    if label_columns:
        absent = [c for c in label_columns if c not in fields]
        if absent:
            raise UserError(f"--label-columns names {', '.join(map(repr, absent))}, absent from {path} "
                            f"(columns: {', '.join(fields)})")
        policy = {"uncertain": uncertain, "blank": blank}
        labels = np.array([[_binary(r[c], policy, f"{path} row {n} column {c!r}") for c in label_columns]
                           for n, r in zip(numbers, rows)], dtype=np.int64)
        classes, task = tuple(label_columns), MULTI_LABEL
    elif label_col is not None:
        values = [r[label_col].strip() for r in rows]
        if "" in values:
            raise UserError(f"{path} row {numbers[values.index('')]} has no label; fill it in or remove the row")
        ints = all(re.fullmatch(r"-?\d+", v) for v in values)
        if ints:
            _integer_labels(path, values, numbers)
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
        for n, r in zip(numbers, rows):
            value = r[split_col].strip().lower()
            if value not in SPLIT_ALIASES:
                raise UserError(f"{path} row {n} has split {r[split_col]!r}; use train, val or test")
            splits.append(SPLIT_ALIASES[value])
    listing = Listing(here, paths, labels, splits, classes, task, _stat(paths))
    if labels is not None:  # unlabeled images are all train: nothing to keep apart
        listing.groups, listing.group_by = _csv_groups(path, fields, rows, group_column, numbers)
    return listing


def _csv_groups(path, fields, rows, group_column, numbers):
    """(group per row, column name) of a manifest, or (None, None); numbers: each row's line number."""
    if group_column is not None and group_column.lower() == "none":
        return None, None
    if group_column is None:
        column = next((c for c in (_column(fields, n) for n in GROUP_COLUMNS) if c is not None), None)
        if column is None:
            return None, None
        print(f"note: {path}: images are grouped by its {column!r} column (one {column}, one split); "
              f"--group-column none takes them image by image", flush=True)
    else:
        column = group_column if group_column in fields else _column(fields, group_column.strip().lower())
        if column is None:
            raise UserError(f"--group-column {group_column}: {path} has no such column (columns: "
                            f"{', '.join(fields)}); name its patient column, or --group-column none")
    groups = [r[column].strip() if r[column] is not None else "" for r in rows]
    if "" in groups:
        raise UserError(f"{path} row {numbers[groups.index('')]} has no {column!r}; fill in every row's group "
                        f"(one id per patient), or --group-column none to split image by image")
    return groups, column


def _draw_order(keys, seed):
    """`keys` in a seeded order that depends on each key itself, not on its place in the listing: an
    image or group added later leaves the others' order unchanged."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())


def draw_splits(listing, ratio, seed, previous):
    """Seeded train/val/test per image, drawn by whole groups (listing.groups; else each image alone),
    stratified by class for single labels. Images already in `previous` (relative path -> split, from
    the stored split file) keep their split, and new images of their group join it; new groups are
    drawn among themselves. Returns (split per image, `previous` updated with every image)."""
    rel = [os.path.relpath(p, listing.root) for p in listing.paths]
    keys = listing.groups if listing.groups is not None else rel
    members = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    splits, fresh, moved = [None] * len(rel), [], 0
    for key, idx in members.items():
        stored = [previous[rel[i]] for i in idx if rel[i] in previous]
        if stored:  # the group stays where its stored images are (most of them, should they disagree)
            split = max(SPLITS, key=stored.count)
            moved += sum(s != split for s in stored)
            for i in idx:
                splits[i] = split
        else:
            fresh.append(key)
    if moved:
        print(f"note: {moved} images of {listing.root} change split so that no {listing.group_by} group is in "
              f"two splits", flush=True)
    # what each new group holds: images per class (multi-label: images), and test's and val's quotas
    single = listing.labels.ndim == 1
    holds = {k: np.bincount(listing.labels[members[k]], minlength=len(listing.class_names)) if single
             else np.array([len(members[k])]) for k in fresh}
    total = sum(holds.values(), np.zeros(len(listing.class_names) if single else 1, np.int64))
    # Test, then val, take the groups in the seeded order that bring them closer to their quota per
    # class (L1); train takes the rest. Single images fill each class's quota exactly, and a group
    # added later moves at most a few others even when no stored split exists. (sklearn's
    # StratifiedGroupKFold has no val split, and its draw depends on the listing, not on the groups.)
    left = _draw_order(fresh, seed)
    for split, share in (("test", ratio[2]), ("val", ratio[1])):
        quota, filled, rest = np.array([round(share * n) for n in total]), np.zeros_like(total), []
        for key in left:
            if np.abs(quota - filled - holds[key]).sum() < np.abs(quota - filled).sum():
                filled += holds[key]
                for i in members[key]:
                    splits[i] = split
            else:
                rest.append(key)
        left = rest
    for key in left:
        for i in members[key]:
            splits[i] = "train"
    return splits, {**previous, **dict(zip(rel, splits))}


def leaking_groups(groups, splits):
    """{group: the splits it is in} for each group found in more than one split, in order of appearance."""
    where = {}
    for group, split in zip(groups, splits):
        where.setdefault(group, set()).add(split)
    return {g: [s for s in SPLITS if s in w] for g, w in where.items() if len(w) > 1}


def check_given_split(source, what, groups, splits, allow, fix):
    """A split given with the data must keep each group in one split: one line naming how many groups
    are in two splits, how many of them touch test and the first one; a refusal (UserError) unless
    `allow` (--allow-group-leak), then a warning. `what`: the groups' name; `fix`: what to change.
    Returns the number of such groups."""
    leaks = leaking_groups(groups, splits)
    if leaks:
        first, where = next(iter(leaks.items()))
        n_test = sum("test" in w for w in leaks.values())
        line = (f"{source} puts {len(leaks)} of its {len(set(groups))} {what} in more than one split ({n_test} of "
                f"them touch test; first: {first!r} in {', '.join(where[:-1])} and {where[-1]})")
        if not allow:
            raise UserError(f"{line}; {fix}, or pass --allow-group-leak to use the split as given")
        print(f"warning: {line}; used as given (--allow-group-leak): test scores can be optimistic", flush=True)
    return len(leaks)


# ---------------------------------------------------------------- pixels
# What a conversion did beyond decoding, reported once per conversion with the number of files
# (convert_images): a source is read whole, so a refusal over these would stop it for one odd file.
FIRST_FRAME = "hold several frames (an animated GIF, WebP or PNG, or a multi-page TIFF): the first one was used"
NON_FINITE = "hold non-finite values (NaN or infinity): set to 0 (black), the rest stretched over their finite range"
MIN_IN_WINDOW = 0.01  # a stored DICOM window that leaves fewer of the pixels in grey is not used (_read_dicom)
WINDOW_UNFIT = (f"are DICOM files whose stored window leaves under {MIN_IN_WINDOW:.0%} of the pixels in grey (a "
                f"flat or two-tone picture): each was stretched over its own range instead")


def _scale(x, notes=None):
    """Intensities without a known display range (16-bit gray, 32-bit and float images; DICOM without a
    usable window) -> uint8 stretched from the image's own minimum to its maximum, over its finite
    values only: non-finite ones (NaN, infinity) become 0 (black), noted in `notes`."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    out = np.zeros(x.shape, np.uint8)
    if not finite.all():
        if notes is not None:
            notes.append(NON_FINITE)
        if not finite.any():
            return out
    lo, hi = x[finite].min(), x[finite].max()
    if hi > lo:
        out[finite] = np.round((x[finite] - lo) * (255 / (hi - lo))).astype(np.uint8)
    return out


def _full_range(x, bits):
    """Integers of `bits` bits -> uint8 over the type's full range, x / (2**bits - 1) * 255: what a viewer
    shows of a 16-bit colour image."""
    return np.round(np.clip(x, 0, None) * (255 / (2 ** bits - 1))).clip(0, 255).astype(np.uint8)


def _read_dicom(path, notes=None):
    """DICOM -> uint8 gray or RGB (docs/DATA.md, "DICOM")."""
    import pydicom
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    # force: a .dcm file without the 128-byte preamble and "DICM" (older exports) is still read
    ds = pydicom.dcmread(path, force=True)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if not _is_dicom(path):
            raise ValueError("not a DICOM image (no DICM header, no pixel data)")
        kind = getattr(ds.get("SOPClassUID"), "name", "") or "object"
        raise ValueError(f"a DICOM file without pixels ({kind}); list only image files")
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset: pixels as encoded as the rest of it
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little
                                          else ExplicitVRBigEndian)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame DICOM; export its frames as single images")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    # as_rgb: pydicom returns YBR_FULL and YBR_FULL_422 as RGB, stored natively or as JPEG (its decoders
    # know whether the JPEG library has already converted them); JPEG 2000's YBR_ICT / YBR_RCT decode to RGB
    raw = pixel_array(ds, as_rgb=True)
    if photometric == "PALETTE COLOR":  # indices into the file's red, green and blue tables
        return _full_range(apply_color_lut(raw, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
    if raw.ndim == 3:  # RGB: the stored bits' full range, as for other colour images
        return raw if raw.dtype == np.uint8 else _full_range(raw, int(ds.get("BitsStored", 8 * raw.itemsize)))
    x = apply_modality_lut(raw, ds)  # rescale slope / intercept (CT: Hounsfield units), or the modality LUT
    shown = None  # the stored VOI LUT or first window, as a viewer shows it, 0..255
    if "VOILUTSequence" in ds:
        out = 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
        shown = np.clip(apply_voi_lut(x, ds, prefer_lut=True) * (255 / out), 0, 255)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, MultiValue) else v)
        # the window's linear function (DICOM PS3.3 C.11.2.1.2.1), to 0..255
        c, w = first(ds.WindowCenter) - 0.5, max(first(ds.WindowWidth) - 1, 1e-6)
        shown = np.clip(((x - c) / w + 0.5) * 255, 0, 255)
    if shown is not None:
        # A stored window is chosen for one organ (brain: 80 HU wide) and a viewer shows the image through
        # it. One that leaves almost every pixel at its darkest or brightest value (a width of 1, a centre
        # outside the image's values, a window for other units) would make the image flat or two-tone,
        # so then the image's own range is used, as for a file without a window.
        grey = np.mean((shown > shown.min()) & (shown < shown.max()))
        if grey >= MIN_IN_WINDOW:
            x = np.round(shown).astype(np.uint8)
        else:
            if notes is not None:
                notes.append(WINDOW_UNFIT)
            x = _scale(x, notes)
    elif raw.dtype == np.uint8 and x.dtype == np.uint8:
        x = raw
    else:
        x = _scale(x, notes)
    return 255 - x if photometric == "MONOCHROME1" else x


def _rawmode(tile):
    """How Pillow unpacks a tile's bytes (PNG keeps the mode string as the tile's args, TIFF a tuple)."""
    return tile.args if isinstance(tile.args, str) else tile.args[0] if tile.args else None


def _deep_colour(img):
    """Whether `img` has more than 8 bits per colour channel, which Pillow keeps only the top 8 of."""
    if img.mode not in ("RGB", "RGBA"):  # (a 16-bit gray + alpha PNG opens as RGBA too)
        return False
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)  # BitsPerSample
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return img.format == "PNG" and ";16" in str(_rawmode(img.tile[0]))


def _with_rawmode(tile, rawmode):
    return tile._replace(args=rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:]))


_OTHER_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def _deep_colour_pixels(path, img):
    """(H, W, C) integers, their bits and the EXIF orientation still to apply, of a 16-bit-per-channel
    colour PNG or TIFF `img` (opened, not loaded). Pillow unpacks each 16-bit sample to its high byte;
    the same data unpacked as if of the other byte order gives the low byte, so two decodes give all 16
    bits. Planar TIFFs, which Pillow cannot unpack at 16 bits, are read with tifffile."""
    rawmodes = [str(_rawmode(t)) for t in img.tile]
    if all(re.fullmatch(r"RGBA?;16[BLN]", r) for r in rawmodes):
        planes = []
        for flip in (False, True):
            with _pillow(path) as again:
                if flip:
                    again.tile = [_with_rawmode(t, _rawmode(t)[:-1] + _OTHER_ORDER[_rawmode(t)[-1]])
                                  for t in again.tile]
                planes.append(np.asarray(again).astype(np.uint16))
                orientation = _orientation(again)  # read after loading: Pillow has turned a TIFF itself
        return planes[0] << 8 | planes[1], 16, orientation
    if img.format == "TIFF":
        return _read_tiff(path)
    raise ValueError(f"a {img.format} with 16 bits per channel stored as {rawmodes[0]}, which Pillow reads only at "
                     f"8 bits; save it as 16-bit gray (without alpha) or as 8-bit colour")


def _read_tiff(path, notes=None):
    """(pixels, bits per sample, orientation tag) of a TIFF that Pillow cannot read in full (planar 16-bit
    colour, float colour, ...), through tifffile, which does not turn the image."""
    try:
        import tifffile
    except ImportError:
        raise ValueError("a TIFF layout that Pillow cannot read in full (such as planar 16-bit colour); pip "
                         "install tifffile, or save it as PNG") from None
    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) > 1 and notes is not None:
            notes.append(FIRST_FRAME)
        page = tif.pages[0]
        x = page.asarray()
        x = np.moveaxis(x, page.axes.index("S"), -1) if "S" in page.axes else x
        orientation = page.tags[274].value if 274 in page.tags else 1
        return x, int(page.bitspersample), int(orientation)


def _to_uint8(x, bits, notes):
    """Pixels of any depth -> uint8: 8-bit as they are, colour integers over their type's full range (what
    a viewer shows), gray integers and any float over their own range (_scale)."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f" or x.ndim == 2:
        return _scale(x, notes)
    return _full_range(x, bits)


def _orientation(img):
    """The EXIF orientation (1-8) a viewer turns the image by; 1 when there is none."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a damaged EXIF block (Pillow raises several types): its pixels are still good
        return 1


def _upright(x, orientation):
    """Pixels turned as the EXIF orientation says a viewer shows them (a phone photo of a film), by
    Pillow's own exif_transpose."""
    if orientation in range(2, 9):
        img = Image.fromarray(x)
        img.getexif()[ExifTags.Base.Orientation] = orientation
        x = np.asarray(ImageOps.exif_transpose(img))
    return x


@contextlib.contextmanager
def _pillow(path):
    """Image.open through a file object: Pillow then reads the file instead of memory-mapping it, whose
    fast path lays out a TIFF turned by its orientation tag (5-8) with the turned size (Pillow 13)."""
    with open(path, "rb") as f, Image.open(f) as img:
        yield img


def _open(path, size, notes=None):
    """Image file -> uint8 (H, W) gray or (H, W, 3) RGB as a viewer shows it (docs/DATA.md, "Images");
    `notes` gets what was done beyond decoding (FIRST_FRAME, NON_FINITE, WINDOW_UNFIT)."""
    notes = [] if notes is None else notes
    if path.lower().endswith(DICOM_EXTS) or _is_dicom(path):
        return _read_dicom(path, notes)
    try:
        with _pillow(path) as img:
            return _from_pillow(path, img, size, notes)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # not a TIFF (or a BigTIFF)
                raise UnidentifiedImageError("Pillow cannot identify it as an image") from None
    x, bits, orientation = _read_tiff(path, notes)
    return _upright(_to_uint8(x, bits, notes), orientation)


def _from_pillow(path, img, size, notes):
    """uint8 pixels of the opened image `img`, turned upright."""
    if getattr(img, "n_frames", 1) > 1:
        notes.append(FIRST_FRAME)  # Image.open shows the first frame
    if _deep_colour(img):
        x, bits, orientation = _deep_colour_pixels(path, img)
        return _upright(_to_uint8(x, bits, notes), orientation)
    if img.format == "JPEG":
        img.draft(img.mode, (2 * size, 2 * size))  # decode big JPEGs at a reduced scale: faster, still >= 2x
    if img.mode in ("L", "RGB"):
        x = np.asarray(img)
    elif img.mode == "F" or img.mode.startswith("I"):  # 16-bit / 32-bit / float gray
        x = _scale(np.asarray(img), notes)
    elif img.mode in ("1", "LA", "La"):
        x = np.asarray(img.convert("L"))
    else:
        x = np.asarray(img.convert("RGB"))  # palette (GIF), RGBA, CMYK, YCbCr: alpha dropped
    return _upright(x, _orientation(img))  # read after loading: Pillow turns a TIFF itself and drops its tag


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


def convert_one(path, size, crop, notes=None):
    """One file -> (array, None), or (None, reason) when it cannot be read; `notes` (a list) gets what
    the reading did beyond decoding (FIRST_FRAME, NON_FINITE, WINDOW_UNFIT)."""
    try:
        x = _open(path, size, notes)
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
        return None, " ".join(f"{type(e).__name__}: {e}".split())  # one line: pydicom's lists break with tabs


def _convert_chunk(paths, size, crop):
    """[(array, error, notes)] of `paths`."""
    done = []
    for p in paths:
        notes = []
        done.append((*convert_one(p, size, crop, notes), notes))
    return done


def _ignore_stop_signals():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert_images(paths, size, crop, desc="converting", processes=None):
    """uint8 (N, size, size), or (N, size, size, 3) when some image is RGB (the gray ones repeated);
    returns (images, number of gray images). Prints one note per kind of NOTES with its number of files."""
    from tqdm import tqdm
    processes = processes or workers()
    out = np.zeros((len(paths), size, size), np.uint8)
    chunk = 64
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    pool, stopped = None, []
    if processes > 1 and len(paths) > 2 * chunk:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        # Workers ignore SIGINT and SIGTERM: a Ctrl-C (sent to the whole process group) or a SIGTERM is this
        # process's to handle, once; it stops the pool below. While the workers are forked a signal is only
        # noted and sent again once they run: raised in fork's own handlers, it would be lost.
        main_thread = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.signal(s, lambda signum, frame: stopped.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        try:
            pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=context,
                                                          initializer=_ignore_stop_signals)
            results = pool.map(_convert_chunk, chunks, [size] * len(chunks), [crop] * len(chunks))
        finally:
            for s, handler in handlers.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)
    else:
        results = (_convert_chunk(c, size, crop) for c in chunks)
    try:
        for signum in stopped[:1]:  # its own handler runs now, inside the try that stops the pool
            os.kill(os.getpid(), signum)
        with tqdm(total=len(paths), desc=desc, unit="img", mininterval=1, disable=None) as bar:
            i = n_gray = 0
            noted = {}  # note -> [number of files, first file]
            for part in results:
                for x, error, notes in part:
                    for note in dict.fromkeys(notes):
                        noted.setdefault(note, [0, paths[i]])[0] += 1
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
    for note, (count, first) in noted.items():
        print(f"note: {count} of {len(paths)} images {note} (first: {first})", flush=True)
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


# The cache key holds each image's content hash, as size and mtime cannot tell an edit that keeps both
# (a pixel fixed in place, a copy with cp -p or rsync -t, a clock set back). Hashing every image on
# every run would read the whole data set each time; so each image's sha256 is kept in
# <source>-contents.json beside the cache with its stamp (size, mtime, ctime, inode), and reused while
# the stamp is unchanged. The ctime is what makes the stamp trustworthy: the OS sets it on every write
# and no user tool can set it back. A stamp is trusted only where the file was last changed RACY_NS
# before it was hashed: an edit in the same timestamp tick as the hashing (timestamps are as coarse as
# 2 s on FAT, a few ms on ext4) would keep the stamp; such a file is hashed again next time (git's
# "racily clean" entries, Documentation/technical/racy-git.txt).
RACY_NS = 2 * 10**9


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_hashes(paths, rel, index_path):
    """sha256 of each file's content, in order: those whose stamp matches one kept in the index file
    `index_path` ({rel path: [size, mtime_ns, ctime_ns, inode, hashed_at_ns, sha256]}) are reused, the
    others read (streamed, on several threads: hashlib releases the GIL), and the index rewritten."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    entries, todo = {}, []
    for path, name in zip(paths, rel):
        now, st = time.time_ns(), os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        kept = index.get(name)
        if isinstance(kept, list) and len(kept) == 6 and kept[:4] == stamp and \
                kept[4] - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
            entries[name] = kept
        else:
            entries[name] = stamp + [now, None]  # stamped before it is read: an edit while it is read shows next time
            todo.append((path, name))
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, workers()))) as pool:
            for (path, name), digest in zip(todo, pool.map(_sha256, [p for p, _ in todo])):
                entries[name][5] = digest
        tmp = f"{index_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, index_path)
        except OSError:  # not kept: the next run hashes these images again
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return [entries[name][5] for name in rel]


def _read_split_file(path):
    with open(path, newline="") as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}


def cached_npz(source, size, options):
    """Path and meta of the npz cache of a folder or CSV `source`, converting when none matches."""
    source = os.path.abspath(source)
    if os.path.isdir(source):
        listing = list_folder(source, options.group_column)
    else:
        listing = list_csv(source, options.label_columns, options.uncertain, options.blank, options.group_column)
    folder = cache_folder(source, options.cache_dir)
    base = os.path.splitext(os.path.basename(source.rstrip(os.sep)))[0] + "-" + _digest(source)[:6]
    grouped, drawn = listing.groups is not None, listing.splits is None
    # a split by groups is a different split from one by images, and is kept in a file of its own
    by = "-by-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in listing.group_by) if grouped else ""
    ratio_name = "-".join(str(round(100 * r)) for r in options.split_ratio)
    split_file, image_file = (os.path.join(folder, f"{base}-split-{ratio_name}{b}.csv") for b in (by, ""))
    rel = [os.path.relpath(p, listing.root) for p in listing.paths]
    stored, n_leaking = {}, 0
    if drawn:
        if os.path.isfile(split_file):
            stored = _read_split_file(split_file)
        elif grouped and os.path.isfile(image_file):
            by_image = _read_split_file(image_file)
            kept = [i for i, r in enumerate(rel) if r in by_image]
            leaks = leaking_groups([listing.groups[i] for i in kept], [by_image[rel[i]] for i in kept])
            print(f"note: the split of {source} is drawn by {listing.group_by} anew; it replaces the image-by-image "
                  f"split stored in {image_file}, which put {len(leaks)} of its "
                  f"{len(set(listing.groups))} groups in two splits", flush=True)
        listing.splits, new_stored = draw_splits(listing, options.split_ratio, options.split_seed, stored)
    elif grouped:
        what = "group folders" if listing.group_by == "folder" else f"{listing.group_by!r} groups"
        fix = ("move each group folder into one split" if listing.group_by == "folder" else
               f"give all rows of a {listing.group_by} the same split (or --group-column none if "
               f"{listing.group_by!r} is not a patient id)")
        n_leaking = check_given_split(source, what, listing.groups, listing.splits, options.allow_group_leak, fix)
    grouping = {"by": listing.group_by, "groups": len(set(listing.groups)), "groups_in_several_splits": n_leaking,
                "split": "drawn" if drawn else "given"} if grouped else None
    for split in (SPLITS if listing.labels is not None else ("train",)):
        n = listing.splits.count(split)
        if n < 2:
            raise UserError(f"{source} gives {n} {split} image(s); a split needs at least 2: add images"
                            + (" or change --split-ratio" if drawn else ""))
    if drawn and stored != new_stored:  # kept as soon as it is drawn, so that it never changes under the user
        group_of = dict(zip(rel, listing.groups)) if grouped else {}
        tmp = f"{split_file}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "split"] + (["group"] if grouped else []))
            w.writerows([p, s] + ([group_of.get(p, "")] if grouped else []) for p, s in new_stored.items())
        os.replace(tmp, split_file)
    csv_bytes = b"" if os.path.isdir(source) else open(source, "rb").read()
    contents = content_hashes(listing.paths, rel, os.path.join(folder, f"{base}-contents.json"))
    key = _digest(CACHE_VERSION, size, options.crop, rel, listing.stats, contents, listing.splits, csv_bytes,
                  listing.labels.tolist() if listing.labels is not None else None, listing.class_names,
                  *([listing.group_by, listing.groups] if grouped else []))
    path = os.path.join(folder, f"{base}-{size}px-{options.crop}-{key[:16]}.npz")
    if os.path.isfile(path):
        with np.load(path) as npz:
            return path, {**json.loads(npz["meta"].tobytes()), "grouping": grouping}
    start = time.time()
    print(f"data: converting {len(rel)} images of {source} to {size} px ({options.crop} crop) with "
          f"{workers()} processes into {path}", flush=True)
    images, n_gray = convert_images(listing.paths, size, options.crop)
    channels = 3 if images.ndim == 4 else 1
    if channels == 3 and n_gray:
        print(f"note: {source} mixes {n_gray} gray and {len(images) - n_gray} RGB images; all are held as "
              f"RGB (gray repeated to 3 channels)", flush=True)
    meta = {"source": source, "task": listing.task, "class_names": list(listing.class_names),
            "channels": channels, "size": size, "hash": key, "grouping": grouping, "files": {}}
    arrays = {}
    order = np.array(listing.splits)
    for split in (SPLITS if listing.labels is not None else ("train",)):
        idx = np.flatnonzero(order == split)
        arrays[f"{split}_images"] = images[idx]
        if listing.labels is not None:
            labels = listing.labels[idx]
            arrays[f"{split}_labels"] = (labels if labels.ndim == 2 else labels[:, None]).astype(
                np.uint8 if len(listing.class_names) <= 256 else np.int64)
        if grouped:  # the cache, given as --data file.npz, keeps its groups
            arrays[f"{split}_groups"] = np.array([listing.groups[i] for i in idx], dtype=str)
        meta["files"][split] = [rel[i] for i in idx]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    for old in os.listdir(folder):  # an older conversion of this source at this size and crop
        superseded = old.startswith(f"{base}-{size}px-{options.crop}-") and old.endswith(".npz")
        if superseded and old != os.path.basename(path):
            os.remove(os.path.join(folder, old))
    took = time.time() - start
    print(f"data: converted in {took:.1f} s ({len(images) / max(took, 1e-9):.0f} images/s)", flush=True)
    return path, meta
