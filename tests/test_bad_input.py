"""A user's own data that cannot be read as meant (CSV manifests, labels, folder layouts) is refused
with one line naming the file, the row or key, and the fix, before anything is written; what can be
read as meant (a ';' manifest, spaced header cells, Windows paths, Kaggle's Training/ and Testing/
folders) is read."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from common import data
from common.errors import UserError

SIZE = 8


def png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), value, np.uint8)).save(path)


def images(folder, n=6):
    """n tiny PNGs of two classes, folder/img<i>.png, class i % 2 (its gray value says which)."""
    for i in range(n):
        png(os.path.join(folder, f"img{i}.png"), 40 + 150 * (i % 2) + i)
    return [(f"img{i}.png", i % 2) for i in range(n)]


def manifest(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        f.write("\n".join(delimiter.join(map(str, r)) for r in rows) + "\n")
    return str(path)


def split_rows(listed):
    """path,label,split rows of 12 listed images: 8 train, then 2 val and 2 test (one of each class)."""
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    return [("path", "label", "split")] + [(p, c, s) for (p, c), s in zip(listed, splits)]


def snapshot(folder):
    """Every file under `folder` (the cache folder left out) -> its bytes' digest and mtime."""
    out = {}
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".medssl-cache"]
        for name in files:
            p = os.path.join(here, name)
            with open(p, "rb") as f:
                out[p] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def refused(source, pattern, options=None):
    """The UserError of loading every split of `source`: one line matching `pattern`."""
    data._resolve.cache_clear()
    with pytest.raises(UserError, match=pattern) as e:
        for split in ("train", "val", "test"):
            data.load_split(source, split, SIZE, options=options or data.DataOptions())
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- CSV manifests
def _csv_in_train_and_test(d):
    rows = split_rows(images(d, 12))
    rows[-1] = (rows[1][0], rows[1][1], "test")  # img0, train on row 2, again as test on row 13
    return manifest(d / "m.csv", rows), r"m.csv: .*img0.png is in train and test \(rows 2 and 13\).*one split"


def _csv_two_labels(d):
    rows = split_rows(images(d, 12))
    rows.append((rows[2][0], 0, "train"))  # img1 (class 1) listed again as class 0
    return manifest(d / "m.csv", rows), r"m.csv: .*img1.png has labels '1' and '0' \(rows 3 and 14\); keep one row"


def _csv_short_row(d):
    rows = split_rows(images(d, 12))
    rows[3] = (rows[3][0], rows[3][1])
    return manifest(d / "m.csv", rows), r"m.csv row 4 has 2 cells but the header has 3 .*fill in the missing cells"


def _csv_missing_file(d):
    rows = split_rows(images(d, 12))
    rows[5] = ("scans/gone.png", 0, "train")
    return manifest(d / "m.csv", rows), r"m.csv lists 1 files that do not exist \(first: row 6 .*gone.png\); fix"


def _csv_negative_label(d):
    rows = split_rows(images(d, 12))
    rows[7] = (rows[7][0], -1, rows[7][2])
    return manifest(d / "m.csv", rows), r"m.csv row 8 has label -1; .*give the row its class or remove it"


def _csv_stray_255(d):
    rows = split_rows(images(d, 12))
    rows[9] = (rows[9][0], 255, rows[9][2])
    return manifest(d / "m.csv", rows), r"m.csv: the integer labels are 0, 1, 255.*row 10 has 255 \(1 row\)"


@pytest.mark.parametrize("case", [_csv_in_train_and_test, _csv_two_labels, _csv_short_row, _csv_missing_file,
                                  _csv_negative_label, _csv_stray_255])
def test_a_bad_manifest_is_refused_naming_its_row_and_the_fix(case, tmp_path):
    source, pattern = case(tmp_path)
    before = snapshot(tmp_path)
    refused(source, pattern)
    assert snapshot(tmp_path) == before
    assert not os.path.isdir(tmp_path / ".medssl-cache") or not os.listdir(tmp_path / ".medssl-cache")


def test_semicolons_spaced_header_cells_and_windows_paths_are_read(tmp_path):
    listed = images(tmp_path / "scans", 12)
    rows = [(" path ", " label", "split ")] + [(f"scans\\{p}", c, s) for (p, c), (_, _, s)
                                                in zip(listed, split_rows(listed)[1:])]
    source = manifest(tmp_path / "m.csv", rows, delimiter=";")
    data._resolve.cache_clear()
    test = data.load_split(source, "test", SIZE)
    assert test.info.class_names == ("0", "1")
    # the test rows' images, in order, with their own labels (a PNG's gray value says its class)
    expected = [c for (_, c), (_, _, s) in zip(listed, split_rows(listed)[1:]) if s == "test"]
    assert test.labels.tolist() == expected
    assert ((test.images.float().mean(dim=(1, 2, 3)) > 115).long() == test.labels).all()


# ---------------------------------------------------------------- labels (a user's npz, and any split)
def npz(d, labels=None, sidecar=None, **arrays):
    """A 3-split npz of 6 tiny images per split, labels (N, 1) 0/1 unless given."""
    rng = np.random.default_rng(0)
    content = {f"{s}_images": rng.integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8) for s in data.SPLITS_3}
    content.update({f"{s}_labels": (np.arange(6) % 2).astype(np.uint8)[:, None] for s in data.SPLITS_3})
    content.update(labels or {})
    content.update(arrays)
    path = str(d / "own.npz")
    np.savez(path, **content)
    if sidecar:
        with open(path + ".json", "w") as f:
            json.dump(sidecar, f)
    return path


def _labels_out_of_range(d):
    test = (np.arange(6) % 2).astype(np.uint8)[:, None]
    test[4] = 2  # a third class the sidecar does not name
    return (npz(d, {"test_labels": test}, {"task": "binary-class", "label": {"0": "benign", "1": "malignant"}}),
            r"own.npz: test_labels row 4 is 2, outside the class indices 0..1 of the 2 names of .*own.npz.json")


def _labels_negative(d):
    val = (np.arange(6) % 2).astype(np.int64)[:, None]
    val[3] = -1
    return npz(d, {"val_labels": val}), r"own.npz: val_labels row 3 is -1; class indices are 0..K-1"


def _labels_stray_255(d):
    train = (np.arange(6) % 2).astype(np.uint8)[:, None]
    train[5] = 255
    return npz(d, {"train_labels": train}), (r"own.npz: the labels take the values 0, 1, 255, not 0..K-1; "
                                             r"train_labels row 5 is 255 .*write .*own.npz.json")


def _labels_multi_label_2(d):
    multi = {f"{s}_labels": np.array([[0, 1], [1, 0]] * 3, np.uint8) for s in data.SPLITS_3}
    multi["val_labels"][2, 1] = 2
    return npz(d, multi), r"own.npz: val_labels row 2 is \[0, 2\]; labels with 2 columns are multi-label .*0 or 1"


def _labels_object_array(d):
    labels = np.empty((6, 1), dtype=object)
    labels[:, 0] = ["benign", "malignant"] * 3
    with np.load(npz(d)) as f:
        content = {**f, "train_labels": labels}
    np.savez(d / "own.npz", **content)  # an object array is pickled into the file
    return str(d / "own.npz"), r"own.npz: train_labels is an object array, not integers; .*own.npz.json"


def _labels_sidecar_too_few_names(d):
    three = {f"{s}_labels": (np.arange(6) % 3).astype(np.uint8)[:, None] for s in data.SPLITS_3}
    return (npz(d, three, {"task": "binary-class", "label": {"0": "a", "1": "b"}}),
            r"own.npz: train_labels row 2 is 2, outside .*or name every class in .*own.npz.json")


def _labels_test_one_class(d):
    return (npz(d, {"test_labels": np.zeros((6, 1), np.uint8)}),
            r"own.npz's test split \(6 images\) has no images of class '1', so its AUC is undefined; add test images")


@pytest.mark.parametrize("case", [_labels_out_of_range, _labels_negative, _labels_stray_255, _labels_multi_label_2,
                                  _labels_object_array, _labels_sidecar_too_few_names, _labels_test_one_class])
def test_labels_that_do_not_fit_the_task_are_refused_naming_the_key_and_row(case, tmp_path):
    source, pattern = case(tmp_path)
    before = snapshot(tmp_path)
    refused(source, pattern)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- folder layouts
def class_folders(d, classes=("glioma", "notumor"), n=3):
    for c, name in enumerate(classes):
        for i in range(n):
            png(os.path.join(d, name, f"{name}{i}.png"), 40 + 150 * c + i)


def _layout_no_val(d):
    for split in ("Training", "Testing"):
        class_folders(d / "brain" / split)
    return str(d / "brain"), (r"brain has split folders Training/ and Testing/ but no val/ .*move some training "
                              r"images .* into .*brain/val/<class>/, or put the class folders directly in .*brain")


def _layout_two_train(d):
    for split in ("train", "Training", "val", "test"):
        class_folders(d / "brain" / split)
    return str(d / "brain"), r"brain has two train folders, Training/ and train/; merge them into one"


def _layout_archive_top(d):
    for split in ("train", "val", "test"):
        class_folders(d / "brain" / "chest_xray" / split)
    return str(d / "brain"), r"brain holds only chest_xray/, which holds split folders; point --data at .*chest_xray"


def _layout_test_one_class(d):
    class_folders(d / "brain", n=4)  # a drawn 80/10/10 split: 10% of 4 images is none
    more = ("glioma",) * 16
    for i, name in enumerate(more):
        png(str(d / "brain" / name / f"more{i}.png"), 40 + i)
    return str(d / "brain"), (r"brain's val split \(2 images\) has no images of class 'notumor', so its AUC is "
                              r"undefined; add val images of that class; a drawn split: .*--split-ratio")


@pytest.mark.parametrize("case", [_layout_no_val, _layout_two_train, _layout_archive_top, _layout_test_one_class])
def test_a_layout_that_is_not_the_one_meant_is_refused_naming_the_layout_to_use(case, tmp_path):
    source, pattern = case(tmp_path)
    before = snapshot(tmp_path)
    refused(source, pattern)
    assert snapshot(tmp_path) == before


def test_kaggle_split_folders_are_splits_not_classes(tmp_path):
    for split in ("Training", "Validation", "Testing"):
        class_folders(tmp_path / "brain" / split)
    data._resolve.cache_clear()
    test = data.load_split(str(tmp_path / "brain"), "test", SIZE)
    assert test.info.class_names == ("glioma", "notumor")
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_bare_flag_is_the_flag_even_beside_a_folder_of_that_name(synthetic, tmp_path, monkeypatch, capsys):
    root = synthetic("breastmnist")
    class_folders(tmp_path / "breastmnist", n=10)
    monkeypatch.chdir(tmp_path)
    data._resolve.cache_clear()
    flag = data.describe("breastmnist", 28, root)
    assert flag.kind == "medmnist" and flag.path == os.path.join(root, "breastmnist.npz")
    assert "pass --data ./breastmnist" in capsys.readouterr().out
    folder = data.describe("./breastmnist", SIZE, root)
    assert folder.kind == "folder" and folder.class_names == ("glioma", "notumor")
    with pytest.raises(UserError, match=r"lists one source twice \('./breastmnist' and 'breastmnist/'\)"):
        data.load_pretrain_images("./breastmnist, breastmnist/", SIZE, root)
    data._resolve.cache_clear()  # the relative path means another folder in the next test


# ---------------------------------------------------------------- through a script: exit 2, one line, nothing written
def test_evaluate_refuses_bad_data_of_each_family_before_writing_anything(tmp_path):
    """One case per family through evaluate.py as a user runs it; the three processes run side by side
    (each spends most of its time importing torch)."""
    import re
    import subprocess
    import sys
    from conftest import REPO, cli_env
    runs = []
    for case in (_csv_in_train_and_test, _labels_sidecar_too_few_names, _layout_no_val):
        d = tmp_path / case.__name__
        d.mkdir()
        source, pattern = case(d)
        runs.append((d, pattern, snapshot(d), subprocess.Popen(
            [sys.executable, "evaluate.py", "--init", "random", "--data", source, "--size", str(SIZE), "--mode",
             "knn", "--out", str(d / "run")], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    for d, pattern, before, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), stderr[-2000:]
        assert not (d / "run").exists()
        assert snapshot(d) == before
