"""Patient-level splits of own data: real BreastMNIST images written as PNGs, with synthetic patients of
consecutive images, as a CSV manifest with a patient_id column, as class folders of patient folders and as
an npz with groups arrays. A drawn split keeps every patient in one split and is kept as drawn; a given
split that puts a patient in two splits is refused in one line."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from common import convert, data
from common.errors import UserError
from conftest import real_arrays

SPLITS = ("train", "val", "test")
CLASSES = ("0_malignant", "1_benign")
N = 240  # images written: enough for 10% splits of both classes, a second to write


@pytest.fixture(autouse=True)
def fresh_describe():
    data._resolve.cache_clear()
    yield
    data._resolve.cache_clear()


@pytest.fixture(scope="module")
def breast():
    """The real file's images in its own order (train, val, test), its split of each, and patients of
    1 to 4 consecutive images (a patient may hold images of both classes)."""
    npz = real_arrays("breastmnist.npz")
    images = np.concatenate([npz[f"{s}_images"] for s in SPLITS])
    labels = np.concatenate([npz[f"{s}_labels"][:, 0] for s in SPLITS])
    split = np.concatenate([[s] * len(npz[f"{s}_labels"]) for s in SPLITS])
    patient = np.repeat(np.arange(len(labels)), np.random.default_rng(0).integers(1, 5, len(labels)))[:len(labels)]
    return {"images": images, "labels": labels, "split": split, "patient": np.array([f"P{p:04d}" for p in patient])}


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def write_manifest(root, breast, index=range(N), split=None):
    """root/imgs/<i>.png and root/m.csv (path, label, patient_id[, split]); {path: patient}."""
    os.makedirs(root / "imgs", exist_ok=True)
    rows, patient_of = [("path", "label", "patient_id") + (("split",) if split else ())], {}
    for i in index:
        rel = f"imgs/{i:04d}.png"
        Image.fromarray(breast["images"][i]).save(root / rel)
        rows.append((rel, int(breast["labels"][i]), breast["patient"][i]) + ((split[i],) if split else ()))
        patient_of[rel] = breast["patient"][i]
    write_csv(root / "m.csv", rows)
    return str(root / "m.csv"), patient_of


def write_patient_folders(root, breast, index=range(N), split=None):
    """root/[<split>/]<class>/<patient>/<i>.png; {path relative to root: patient}."""
    patient_of = {}
    for i in index:
        rel = os.path.join(*([split[i]] if split else []), CLASSES[breast["labels"][i]], breast["patient"][i],
                           f"{i:04d}.png")
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        Image.fromarray(breast["images"][i]).save(root / rel)
        patient_of[rel] = breast["patient"][i]
    return str(root), patient_of


def split_of(info):
    """{image path: split} from the cache's meta, and the cache's groups arrays."""
    with np.load(info.path) as npz:
        meta = json.loads(npz["meta"].tobytes())
        groups = {s: npz[f"{s}_groups"].tolist() for s in SPLITS if f"{s}_groups" in npz.files}
    return {p: s for s in SPLITS for p in meta["files"][s]}, groups


def patients_in_several_splits(split, patient_of):
    where = {}
    for path, s in split.items():
        where.setdefault(patient_of[path], set()).add(s)
    return {p for p, w in where.items() if len(w) > 1}


def check_stratified(split, label_of):
    """Val and test hold about 10% of the images each, with about the whole set's share of each class."""
    labels = np.array([label_of[p] for p in split])
    for s in ("val", "test"):
        in_s = np.array([split[p] == s for p in split])
        assert abs(in_s.sum() - 0.1 * len(labels)) <= 3, (s, in_s.sum())
        assert abs(labels[in_s].mean() - labels.mean()) <= 0.08, (s, labels[in_s].mean(), labels.mean())


# ---------------------------------------------------------------- a CSV manifest with a patient column
def test_csv_patient_column_keeps_each_patient_in_one_split(breast, tmp_path, capsys):
    source, patient_of = write_manifest(tmp_path, breast)
    info = data.describe(source)
    out = capsys.readouterr().out
    assert "grouped by its 'patient_id' column" in out and "--group-column none" in out
    n_patients = len(set(patient_of.values()))
    assert n_patients < N / 2  # several images per patient
    assert info.grouping == {"by": "patient_id", "groups": n_patients, "groups_in_several_splits": 0, "split": "drawn"}
    assert json.loads(json.dumps(info.grouping)) == info.grouping and isinstance(hash(info), int)  # for metrics.json
    split, groups = split_of(info)
    assert sorted(split) == sorted(patient_of) and not patients_in_several_splits(split, patient_of)
    for s in SPLITS:  # the cache's groups arrays are the manifest's patients
        assert groups[s] == [patient_of[p] for p, t in split.items() if t == s]
    check_stratified(split, {f"imgs/{i:04d}.png": breast["labels"][i] for i in range(N)})
    # image by image, the same images put patients in two splits: what the check above would catch
    data._resolve.cache_clear()
    by_image = data.describe(source, options=data.DataOptions(group_column="none"))
    assert by_image.grouping is None and "grouped by" not in capsys.readouterr().out
    assert patients_in_several_splits(split_of(by_image)[0], patient_of)
    # a column named on the command line, any case; an absent one is one line
    data._resolve.cache_clear()
    assert data.describe(source, options=data.DataOptions(group_column="PATIENT_ID")).grouping == info.grouping
    with pytest.raises(UserError, match=r"--group-column study: .*m.csv has no such column \(columns: path, label, "
                                        r"patient_id\)") as e:
        data.describe(source, options=data.DataOptions(group_column="study"))
    assert "\n" not in str(e.value)


def test_drawn_split_is_kept_when_run_again_and_when_images_are_added(breast, tmp_path, capsys):
    source, patient_of = write_manifest(tmp_path, breast)
    first = data.describe(source)
    before, _ = split_of(first)
    data._resolve.cache_clear()
    capsys.readouterr()
    assert data.describe(source) == first and "converting" not in capsys.readouterr().out  # the cache, as it was
    # two rows in the middle of the manifest: an image of a patient already in test, and a new patient
    in_test = next(p for p in before if before[p] == "test")
    rows = list(csv.reader(open(source)))
    for name, patient, label in (("extra_a.png", patient_of[in_test], 0), ("extra_b.png", "P9999", 1)):
        Image.fromarray(breast["images"][N]).save(tmp_path / "imgs" / name)
        rows.insert(N // 2, (f"imgs/{name}", label, patient))
    write_csv(source, rows)
    data._resolve.cache_clear()
    after, _ = split_of(data.describe(source))
    assert {p: after[p] for p in before} == before  # every image already drawn keeps its split
    assert after["imgs/extra_a.png"] == "test"  # and a new image joins its patient
    # the data moved (its stored split is not found): drawn again, the images drawn before mostly keep
    # their split, since each patient's place in the draw comes from its id, not its row
    shutil.copytree(tmp_path / "imgs", tmp_path / "moved" / "imgs")
    write_csv(tmp_path / "moved" / "m.csv", [r for r in rows if r[0] != "imgs/extra_a.png"])
    moved, _ = split_of(data.describe(str(tmp_path / "moved" / "m.csv")))
    assert sum(moved[p] != before[p] for p in before) <= 6


def test_a_new_grouped_split_replaces_an_image_by_image_one_with_a_note(breast, tmp_path, capsys):
    source, patient_of = write_manifest(tmp_path, breast)
    by_image, _ = split_of(data.describe(source, options=data.DataOptions(group_column="none")))
    n_leaking = len(patients_in_several_splits(by_image, patient_of))
    data._resolve.cache_clear()
    capsys.readouterr()
    split, _ = split_of(data.describe(source))
    out = capsys.readouterr().out
    assert f"replaces the image-by-image split stored in {tmp_path / '.medssl-cache'}" in out
    assert f"which put {n_leaking} of its {len(set(patient_of.values()))} groups in two splits" in out
    assert not patients_in_several_splits(split, patient_of)
    assert sorted(f for f in os.listdir(tmp_path / ".medssl-cache") if "-split-" in f) == \
        sorted(f"m-{convert._digest(source)[:6]}-split-80-10-10{by}.csv" for by in ("", "-by-patient_id"))


# ---------------------------------------------------------------- class folders of patient folders
def test_folder_convention_groups_by_the_folder_below_the_class_folder(breast, tmp_path, capsys):
    source, patient_of = write_patient_folders(tmp_path / "d", breast)
    classes_of = {}
    for path, patient in patient_of.items():
        classes_of.setdefault(patient, set()).add(path.split(os.sep)[0])
    assert max(map(len, classes_of.values())) == 2  # a patient with images in both classes: one group
    plain = data.describe(source)  # not asked for: no groups, and a note naming the flag
    assert plain.grouping is None and "pass --group-column folder" in capsys.readouterr().out
    data._resolve.cache_clear()
    options = data.DataOptions(group_column="folder")
    info = data.describe(source, options=options)
    assert info.grouping == {"by": "folder", "groups": len(set(patient_of.values())), "groups_in_several_splits": 0,
                             "split": "drawn"}
    split, groups = split_of(info)
    assert sorted(split) == sorted(patient_of) and not patients_in_several_splits(split, patient_of)
    assert [g for s in SPLITS for g in groups[s]] == [patient_of[p] for s in SPLITS for p in split if split[p] == s]
    check_stratified(split, {p: CLASSES.index(p.split(os.sep)[0]) for p in split})
    assert data.load_split(source, "test", options=options).info == info
    # again, then with one more image of a patient: the old images keep their splits, the new one its patient's
    data._resolve.cache_clear()
    assert data.describe(source, options=options) == info
    old = next(p for p in split if split[p] == "val")
    shutil.copy(os.path.join(source, old), os.path.join(source, os.path.dirname(old), "zz_new.png"))
    data._resolve.cache_clear()
    after, _ = split_of(data.describe(source, options=options))
    assert {p: after[p] for p in split} == split and after[os.path.join(os.path.dirname(old), "zz_new.png")] == "val"


def test_folder_convention_errors_are_one_line(breast, tmp_path):
    source, _ = write_patient_folders(tmp_path / "d", breast, range(40))
    Image.fromarray(breast["images"][0]).save(tmp_path / "d" / CLASSES[1] / "loose.png")
    with pytest.raises(UserError, match=r"--group-column folder: .*loose.png sits directly in its class folder; "
                                        r"put every image in a group folder") as e:
        data.describe(source, options=data.DataOptions(group_column="folder"))
    with pytest.raises(UserError, match="--group-column patient_id: a folder of images has no columns") as f:
        data.describe(source, options=data.DataOptions(group_column="patient_id"))
    assert "\n" not in str(e.value) + str(f.value)


# ---------------------------------------------------------------- a given split that puts a patient in two
def per_image_split(n, seed=0):
    """A split drawn image by image, as a user might have made it, knowing nothing of the patients."""
    return list(np.random.default_rng(seed).choice(SPLITS, n, p=(0.8, 0.1, 0.1)))


def leak_line(splits_of_images, patients, what):
    """The start of the expected line, counted here from the data the test wrote."""
    where, patients = {}, [str(p) for p in patients]
    for p, s in zip(patients, splits_of_images):
        where.setdefault(p, []).append(s)
    leaking = [p for p in dict.fromkeys(patients) if len(set(where[p])) > 1]
    touching = sum("test" in where[p] and len(set(where[p])) > 1 for p in leaking)
    first = [s for s in SPLITS if s in where[leaking[0]]]
    first = f"{', '.join(first[:-1])} and {first[-1]}"
    return (f"puts {len(leaking)} of its {len(where)} {what} in more than one split ({touching} of them touch test; "
            f"first: {leaking[0]!r} in {first})"), len(leaking)


def test_given_split_that_puts_a_patient_in_two_splits_is_refused_in_one_line(breast, tmp_path, capsys):
    split = per_image_split(N)
    source, _ = write_manifest(tmp_path, breast, range(N), split)
    expected, n_leaking = leak_line(split, breast["patient"][:N], "'patient_id' groups")
    assert n_leaking > 0
    with pytest.raises(UserError) as e:
        data.describe(source)
    line = str(e.value)
    assert expected in line and "\n" not in line
    assert "--allow-group-leak" in line and "--group-column none" in line
    assert not os.path.exists(tmp_path / ".medssl-cache") or not any(
        f.endswith(".npz") for f in os.listdir(tmp_path / ".medssl-cache"))
    # accepted on request, with a warning, and the description says how many patients leak
    capsys.readouterr()
    info = data.describe(source, options=data.DataOptions(allow_group_leak=True))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and expected in warning[0]
    assert info.grouping["groups_in_several_splits"] == n_leaking and info.grouping["split"] == "given"
    # a given split that keeps each patient together passes
    by_patient = [("test", "val", "train", "train", "train")[int(p[1:]) % 5] for p in breast["patient"][:N]]
    ok, _ = write_manifest(tmp_path / "ok", breast, range(N), by_patient)
    assert data.describe(ok).grouping == {"by": "patient_id", "groups": len(set(breast["patient"][:N])),
                                          "groups_in_several_splits": 0, "split": "given"}


def test_split_folders_with_a_patient_in_two_splits_are_refused(breast, tmp_path):
    split = per_image_split(100)
    source, patient_of = write_patient_folders(tmp_path / "d", breast, range(100), split)
    # the listing's order: split, class, patient folder
    order = sorted(range(100), key=lambda i: (SPLITS.index(split[i]), breast["labels"][i], breast["patient"][i], i))
    expected, n_leaking = leak_line([split[i] for i in order], breast["patient"][order], "group folders")
    assert n_leaking > 0
    with pytest.raises(UserError, match="move each group folder into one split") as e:
        data.describe(source, options=data.DataOptions(group_column="folder"))
    assert expected in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- an npz with groups arrays
def test_npz_groups_arrays(breast, tmp_path, capsys):
    arrays = {f"{s}_{k}": v[breast["split"] == s] for s in SPLITS
              for k, v in (("images", breast["images"]), ("labels", breast["labels"][:, None].astype(np.uint8)))}
    own = {f"{s}_groups": np.array([f"{s}{i // 3}" for i in range((breast["split"] == s).sum())]) for s in SPLITS}
    np.savez(tmp_path / "ok.npz", **arrays, **own)
    info = data.describe(str(tmp_path / "ok.npz"))
    n_groups = len({g for v in own.values() for g in v})
    assert info.grouping == {"by": "npz", "groups": n_groups, "groups_in_several_splits": 0, "split": "given"}
    data._resolve.cache_clear()
    assert data.describe(str(tmp_path / "ok.npz"), options=data.DataOptions(group_column="none")).grouping is None
    # integer ids counted from 0 in every split: the same ids in several splits
    ids = {f"{s}_groups": np.arange((breast["split"] == s).sum()) // 3 for s in SPLITS}
    np.savez(tmp_path / "leak.npz", **arrays, **ids)
    expected, n_leaking = leak_line(breast["split"], [str(i) for s in SPLITS for i in ids[f"{s}_groups"]],
                                    "groups (*_groups arrays)")
    with pytest.raises(UserError, match="--allow-group-leak") as e:
        data.describe(str(tmp_path / "leak.npz"))
    assert expected in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    allowed = data.describe(str(tmp_path / "leak.npz"), options=data.DataOptions(allow_group_leak=True))
    assert allowed.grouping["groups_in_several_splits"] == n_leaking and "warning:" in capsys.readouterr().out
    for name, bad, pattern in (("part", {"train_groups": own["train_groups"]}, "has train_groups but no val_groups, "
                                         "test_groups"),
                               ("short", {**own, "val_groups": own["val_groups"][:5]}, "val_groups is <U\\d+ of shape "
                                                                                        "\\(5,\\); expected one"),
                               ("object", {**own, "test_groups": own["test_groups"].astype(object)},
                                "test_groups is an object array")):
        np.savez(tmp_path / f"{name}.npz", **arrays, **bad)
        with pytest.raises(UserError, match=pattern) as e:
            data.describe(str(tmp_path / f"{name}.npz"))
        assert "\n" not in str(e.value)


def test_a_grouped_cache_given_as_an_npz_keeps_its_groups(breast, tmp_path):
    source, patient_of = write_manifest(tmp_path, breast)
    info = data.describe(source)
    again = data.describe(info.path)
    assert again.grouping == {**info.grouping, "by": "npz", "split": "given"}


# ---------------------------------------------------------------- the draw itself
def test_the_draw_is_as_stratified_as_sklearns_stratified_group_k_fold(breast):
    """The hand-written draw against scikit-learn's StratifiedGroupKFold (10 folds, one held out = 10%):
    groups never split, and the test split's size and class share no further from the target than
    StratifiedGroupKFold's over 5 seeds; single images fill each class's quota exactly."""
    from sklearn.model_selection import StratifiedGroupKFold
    labels = breast["labels"]
    n = len(labels)
    paths = [f"/d/{i:04d}.png" for i in range(n)]
    for largest in (4, 8, 30):
        patient = np.repeat(np.arange(n), np.random.default_rng(largest).integers(1, largest + 1, n))[:n].astype(str)
        listing = convert.Listing("/d", paths, labels, None, CLASSES, "binary-class", None, list(patient), "patient")
        split = np.array(convert.draw_splits(listing, (0.8, 0.1, 0.1), 0, {})[0])
        assert not convert.leaking_groups(patient, split)
        ours = [abs(labels[split == "test"].mean() - labels.mean()), abs((split == "test").sum() - n / 10)]
        theirs = []
        for seed in range(5):
            _, fold = next(StratifiedGroupKFold(10, shuffle=True, random_state=seed).split(labels, labels, patient))
            theirs.append([abs(labels[fold].mean() - labels.mean()), abs(len(fold) - n / 10)])
        assert ours[0] <= max(t[0] for t in theirs) + 0.005 and ours[1] <= max(t[1] for t in theirs) + 2, \
            (largest, ours, theirs)
    listing = convert.Listing("/d", paths, labels, None, CLASSES, "binary-class", None)
    split = np.array(convert.draw_splits(listing, (0.7, 0.15, 0.15), 0, {})[0])
    for c in (0, 1):
        n_c = (labels == c).sum()
        assert [(labels[split == s] == c).sum() for s in SPLITS] == \
            [n_c - 2 * round(0.15 * n_c), round(0.15 * n_c), round(0.15 * n_c)]
