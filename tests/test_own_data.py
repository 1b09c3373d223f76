"""Users' own images: the real BreastMNIST images written as PNG folders, CSV manifests, DICOM and
npz files come back through the cache with exactly their pixels and labels; every bad input is one
line naming the file and the fix."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import convert, data, flags
from common.errors import UserError
from conftest import REAL_ROOT, real_arrays

SPLITS = ("train", "val", "test")
CLASSES = ("0_malignant", "1_benign")  # sorted by name = BreastMNIST's label indices


@pytest.fixture(autouse=True)
def fresh_describe():
    data._resolve.cache_clear()  # each test sees the files as they are now
    yield
    data._resolve.cache_clear()


@pytest.fixture(scope="module")
def breast():
    return real_arrays("breastmnist.npz")


@pytest.fixture(scope="module")
def layouts(breast, tmp_path_factory):
    """BreastMNIST as PNG split folders, as class folders only, and a CSV manifest of the former."""
    base = tmp_path_factory.mktemp("own")
    rows = [("path", "label", "split")]
    for split in SPLITS:
        for i, (x, y) in enumerate(zip(breast[f"{split}_images"], breast[f"{split}_labels"][:, 0])):
            for rel in (f"split/{split}/{CLASSES[y]}/{i:04d}.png", f"classes/{CLASSES[y]}/{split}{i:04d}.png"):
                os.makedirs(os.path.dirname(base / rel), exist_ok=True)
                Image.fromarray(x).save(base / rel)
            rows.append((f"split/{split}/{CLASSES[y]}/{i:04d}.png", int(y), split))
    write_csv(base / "manifest.csv", rows)
    return base


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def by_label_then_index(breast, split):
    labels = breast[f"{split}_labels"][:, 0]
    order = np.lexsort((np.arange(len(labels)), labels))  # ImageFolder order: class, then file name
    return breast[f"{split}_images"][order], labels[order]


def write_dicom(path, pixels, **attrs):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------- the three layouts and DICOM, exact
def test_split_folders_hold_the_original_pixels_and_labels(breast, layouts):
    info = data.describe(str(layouts / "split"))
    assert (info.kind, info.task, info.class_names, info.channels, info.n_classes) == \
        ("folder", "binary-class", CLASSES, 1, 2)
    for split in SPLITS:
        s = data.load_split(str(layouts / "split"), split)
        images, labels = by_label_then_index(breast, split)
        assert s.images.shape == (len(images), 1, 28, 28) and s.info == info
        assert np.array_equal(s.images[:, 0].numpy(), images) and np.array_equal(s.labels.numpy(), labels)


def test_csv_manifest_keeps_row_order_so_it_is_the_npz_itself(breast, layouts):
    for split in SPLITS:
        s = data.load_split(str(layouts / "manifest.csv"), split)
        assert np.array_equal(s.images[:, 0].numpy(), breast[f"{split}_images"])
        assert np.array_equal(s.labels.numpy(), breast[f"{split}_labels"][:, 0])
    # label names instead of integers: classes sorted by name
    rows = [("path", "label", "split")] + [(r[0], ("malignant", "benign")[int(r[1])], r[2]) for r in
                                            list(csv.reader(open(layouts / "manifest.csv")))[1:]]
    write_csv(layouts / "named.csv", rows)
    named = data.load_split(str(layouts / "named.csv"), "test")
    assert named.info.class_names == ("benign", "malignant")
    assert np.array_equal(named.labels.numpy(), 1 - breast["test_labels"][:, 0])


def test_class_folders_get_a_stratified_80_10_10_split_kept_with_the_cache(breast, layouts):
    source = str(layouts / "classes")
    loaded = {s: data.load_split(source, s) for s in SPLITS}
    all_labels = np.concatenate([breast[f"{s}_labels"][:, 0] for s in SPLITS])
    for c in (0, 1):
        n_c = (all_labels == c).sum()
        assert [(loaded[s].labels == c).sum().item() for s in ("val", "test")] == [round(0.1 * n_c)] * 2
    # every original image exactly once, with its label
    original = sorted((x.tobytes(), int(y)) for s in SPLITS
                      for x, y in zip(breast[f"{s}_images"], breast[f"{s}_labels"][:, 0]))
    got = sorted((x[0].numpy().tobytes(), int(y)) for s in SPLITS for x, y in zip(loaded[s].images, loaded[s].labels))
    assert got == original
    stored = [f for f in os.listdir(layouts / ".medssl-cache") if f.startswith("classes-") and "-split-80-10-10" in f]
    assert len(stored) == 1


def test_dicom_files_hold_the_original_pixels(breast, tmp_path):
    rows = [("path", "label", "split")]
    for split in SPLITS:
        for i, (x, y) in enumerate(zip(breast[f"{split}_images"], breast[f"{split}_labels"][:, 0])):
            write_dicom(tmp_path / f"{split}{i:04d}.dcm", x)
            rows.append((f"{split}{i:04d}.dcm", int(y), split))
    write_csv(tmp_path / "dicom.csv", rows)
    for split in SPLITS:
        s = data.load_split(str(tmp_path / "dicom.csv"), split)
        assert np.array_equal(s.images[:, 0].numpy(), breast[f"{split}_images"])
        assert np.array_equal(s.labels.numpy(), breast[f"{split}_labels"][:, 0])


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    # HU = 2 * raw - 1000; window centre 1000 width 2001: HU -1000 -> 0, 1000 -> 128, 3000 -> 255
    write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001)
    x, err = convert.convert_one(str(tmp_path / "ct.dcm"), 2, "center")
    assert err is None and x.tolist() == [[0, 128], [255, 255]]
    write_dicom(tmp_path / "m1.dcm", np.array([[0, 10], [20, 255]], np.uint8), PhotometricInterpretation="MONOCHROME1")
    assert convert.convert_one(str(tmp_path / "m1.dcm"), 2, "center")[0].tolist() == [[255, 245], [235, 0]]
    write_dicom(tmp_path / "nowindow.dcm", raw)  # 16-bit without a window: its own range to 0..255
    assert convert.convert_one(str(tmp_path / "nowindow.dcm"), 2, "center")[0].tolist() == [[0, 85], [170, 255]]


def test_16_bit_png_rgb_and_crop_modes(tmp_path):
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)).save(tmp_path / "a.png")
    x, err = convert.convert_one(str(tmp_path / "a.png"), 2, "center")
    assert err is None and x.tolist() == [[0, 64], [128, 255]]
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 200  # a bright centre square between dark sides
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert (convert.convert_one(str(tmp_path / "wide.png"), 20, "center")[0] == 200).all()
    padded = convert.convert_one(str(tmp_path / "wide.png"), 40, "pad")[0]
    assert padded.shape == (40, 40) and (padded[:10] == 0).all() and (padded[10:30, 10:30] == 200).all()
    assert convert.convert_one(str(tmp_path / "wide.png"), 10, "stretch")[0].shape == (10, 10)
    Image.fromarray(np.dstack([wide] * 3)).convert("RGB").save(tmp_path / "grayrgb.jpg", quality=100)
    assert convert.convert_one(str(tmp_path / "grayrgb.jpg"), 20, "center")[0].ndim == 2  # equal channels: gray
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(convert.convert_one(str(tmp_path / "rgb.png"), 20, "center")[0], rgb)


def test_mixed_gray_and_rgb_folder_is_held_as_rgb_with_a_note(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "mix" / c)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "mix" / c / f"g{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "mix" / c / "rgb.png")
    info = data.describe(str(tmp_path / "mix"), 8, options=data.DataOptions(split_ratio=(0.6, 0.2, 0.2)))
    assert info.channels == 3 and "mixes 10 gray and 2 RGB images" in capsys.readouterr().out
    train = data.load_split(str(tmp_path / "mix"), "train", 8, options=data.DataOptions(split_ratio=(0.6, 0.2, 0.2)))
    assert train.images.shape[1] == 3
    with pytest.raises(UserError, match="--in-chans 3"):
        data.load_split(str(tmp_path / "mix"), "train", 8, in_chans=1,
                        options=data.DataOptions(split_ratio=(0.6, 0.2, 0.2)))


# ---------------------------------------------------------------- cache
def small_class_folders(root, breast, n=40):
    for i in range(n):
        y = breast["train_labels"][i, 0]
        os.makedirs(root / CLASSES[y], exist_ok=True)
        Image.fromarray(breast["train_images"][i]).save(root / CLASSES[y] / f"{i:03d}.png")
    return str(root)


def test_second_load_reuses_the_cache_and_a_touched_file_converts_again(breast, tmp_path, capsys):
    source = small_class_folders(tmp_path / "imgs", breast)
    first = data.describe(source)
    assert "converting 40 images" in capsys.readouterr().out
    data._resolve.cache_clear()
    assert data.describe(source) == first and "converting" not in capsys.readouterr().out
    split_before = {s: data.load_split(source, s).images.numpy() for s in SPLITS}
    touched = tmp_path / "imgs" / CLASSES[1] / os.listdir(tmp_path / "imgs" / CLASSES[1])[0]
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))
    data._resolve.cache_clear()
    second = data.describe(source)
    assert "converting 40 images" in capsys.readouterr().out and second.hash != first.hash
    assert not os.path.exists(first.path)  # the superseded conversion is removed
    for s in SPLITS:  # the stored split: the same images in the same splits
        assert np.array_equal(data.load_split(source, s).images.numpy(), split_before[s])
    # a cache folder of its own through $MEDSSL_CACHE
    os.environ["MEDSSL_CACHE"] = str(tmp_path / "cache")
    try:
        data._resolve.cache_clear()
        assert data.describe(source).path.startswith(str(tmp_path / "cache"))
    finally:
        del os.environ["MEDSSL_CACHE"]


# ---------------------------------------------------------------- unlabeled, multi-label, npz, host memory
def test_unlabeled_folder_loads_for_pretraining_and_is_refused_for_evaluation(breast, tmp_path):
    os.makedirs(tmp_path / "flat")
    for i, x in enumerate(breast["test_images"][:30]):
        Image.fromarray(x).save(tmp_path / "flat" / f"{i:03d}.png")
    images = data.load_pretrain_images(str(tmp_path / "flat"), in_chans=1)
    assert np.array_equal(images[:, 0].numpy(), breast["test_images"][:30])
    assert data.describe(str(tmp_path / "flat")).task == "unlabeled"
    assert data.monitor_splits(str(tmp_path / "flat"), 28, None, "cpu", 3) is None
    with pytest.raises(UserError, match="unlabeled.*evaluation needs labels"):
        data.load_split(str(tmp_path / "flat"), "train")
    union = data.load_pretrain_images(f"{tmp_path / 'flat'},breastmnist", root=REAL_ROOT)
    assert len(union) == 30 + len(breast["train_images"])


def multi_label_csv(tmp_path, breast, cells):
    rows = [("path", "Effusion", "Edema", "split")]
    for i, split in enumerate(["train"] * 6 + ["val"] * 3 + ["test"] * 3):
        Image.fromarray(breast["train_images"][i]).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", *cells[i % len(cells)], split))
    write_csv(tmp_path / "ml.csv", rows)
    return str(tmp_path / "ml.csv")


def test_multi_label_csv_and_its_blank_and_uncertain_policies(breast, tmp_path):
    source = multi_label_csv(tmp_path, breast, [("1", "0"), ("", "1.0"), ("-1", "0"), ("0", "1")])
    with pytest.raises(UserError, match=r"row 4 column 'Effusion' is uncertain.*--uncertain-label"):
        data.describe(source, options=data.DataOptions(label_columns=("Effusion", "Edema")))
    options = data.DataOptions(label_columns=("Effusion", "Edema"), uncertain="one")
    s = data.load_split(source, "train", options=options)
    assert s.task == "multi-label, binary-class" and s.info.class_names == ("Effusion", "Edema")
    assert s.labels.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]  # blank 0, uncertain 1
    with pytest.raises(UserError, match="--label-columns names 'Cardiomegaly', absent"):
        data.describe(source, options=data.DataOptions(label_columns=("Cardiomegaly",)))
    bad = multi_label_csv(tmp_path, breast, [("1", "2")])
    with pytest.raises(UserError, match="column 'Edema' holds '2'; multi-label columns take 0 or 1"):
        data.describe(bad, options=data.DataOptions(label_columns=("Effusion", "Edema")))


def test_own_npz_under_a_medmnist_name_loads_with_inferred_or_sidecar_task(breast, tmp_path, capsys):
    path = tmp_path / "breastmnist.npz"
    np.savez(path, **breast)
    info = data.describe(str(path))
    assert (info.kind, info.task, info.n_classes) == ("npz", "binary-class", 2)
    assert "inferred task 'binary-class' with 2 classes" in capsys.readouterr().out
    assert np.array_equal(data.load_split(str(path), "val").images[:, 0].numpy(), breast["val_images"])
    json.dump({"task": "binary-class", "label": {"0": "malignant", "1": "benign"}}, open(str(path) + ".json", "w"))
    data._resolve.cache_clear()
    assert data.describe(str(path)).class_names == ("malignant", "benign") and "note" not in capsys.readouterr().out
    json.dump({"task": "binary", "label": {"0": "a", "1": "b"}}, open(str(path) + ".json", "w"))
    data._resolve.cache_clear()
    with pytest.raises(UserError, match="task 'binary' is not one of 'binary-class'"):
        data.describe(str(path))
    with pytest.raises(UserError, match="holds 28 px images; pass --size 28"):
        data.describe(str(path), 64)


def test_host_memory_mode_gives_the_same_batch_as_device_mode(layouts):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = str(layouts / "manifest.csv")
    on_device = data.load_split(source, "train", device=device)
    on_host = data.load_split(source, "train", device=device, options=data.DataOptions(host_memory=True))
    assert on_host.images.device.type == "cpu" and on_host.images.is_pinned() == torch.cuda.is_available()
    idx = torch.randperm(len(on_device.images), generator=torch.Generator().manual_seed(0))[:32].to(device)
    host_batch = data.batch(on_host.images, idx, device)
    assert host_batch.device == on_device.images.device
    assert torch.equal(host_batch, data.batch(on_device.images, idx, device))
    assert torch.equal(data.batch(on_host.images, slice(3, 9), device), on_device.images[3:9])


def test_data_flags_become_options():
    import argparse
    parser = argparse.ArgumentParser()
    flags.add_data_flags(parser.add_argument_group("data"))
    args = parser.parse_args(["--split-ratio", "70/15/15", "--label-columns", "A, B", "--uncertain-label", "zero",
                              "--crop", "pad", "--host-memory", "--group-column", "subject", "--allow-group-leak"])
    options = data.options_from(vars(args))
    assert options == data.DataOptions(split_ratio=(0.7, 0.15, 0.15), label_columns=("A", "B"), uncertain="zero",
                                       crop="pad", host_memory=True, group_column="subject", allow_group_leak=True)
    assert data.options_from(vars(parser.parse_args([]))) == data.DataOptions()
    with pytest.raises(SystemExit):
        parser.parse_args(["--split-ratio", "80/20"])


# ---------------------------------------------------------------- bad inputs: one line, file and fix named
def _bad_corrupt(tmp_path, breast):
    small_class_folders(tmp_path / "d", breast, 30)
    (tmp_path / "d" / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG not really")
    return str(tmp_path / "d"), "cannot read image .*broken.png.*replace or remove the file"


def _bad_no_images(tmp_path, breast):
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / "notes.txt").write_text("no images here")
    return str(tmp_path / "d"), "holds no images"


def _bad_empty_class(tmp_path, breast):
    small_class_folders(tmp_path / "d", breast, 30)
    os.makedirs(tmp_path / "d" / "2_empty")
    return str(tmp_path / "d"), "class folder .*2_empty holds no images.*add its images or remove the folder"


def _bad_split_lacks_class(tmp_path, breast):
    for split in SPLITS:
        small_class_folders(tmp_path / "d" / split, breast, 30)
    shutil.rmtree(tmp_path / "d" / "val" / CLASSES[1])
    return str(tmp_path / "d"), "val lacks class folder '1_benign' that train has"


def _bad_csv_no_path(tmp_path, breast):
    write_csv(tmp_path / "m.csv", [("file", "label"), ("a.png", 0)])
    return str(tmp_path / "m.csv"), "has no 'path' column"


def _bad_csv_missing_files(tmp_path, breast):
    write_csv(tmp_path / "m.csv", [("path", "label")] + [(f"gone{i}.png", i % 2) for i in range(5)])
    return str(tmp_path / "m.csv"), "lists 5 files that do not exist \\(first: .*gone0.png, .*gone1.png, .*gone2.png\\)"


def _bad_tiny_split(tmp_path, breast):
    small_class_folders(tmp_path / "d", breast, 12)
    return str(tmp_path / "d"), "gives [01] (val|test) image\\(s\\); a split needs at least 2.*--split-ratio"


def _bad_npz_keys(tmp_path, breast):
    np.savez(tmp_path / "x.npz", train_images=breast["train_images"], train_labels=breast["train_labels"])
    return str(tmp_path / "x.npz"), "lacks val_images, val_labels, test_images, test_labels"


def _bad_npz_dtype(tmp_path, breast):
    np.savez(tmp_path / "x.npz", **{**breast, "train_images": breast["train_images"].astype(np.float32)})
    return str(tmp_path / "x.npz"), "train_images is float32, not uint8"


def _bad_npz_shape(tmp_path, breast):
    np.savez(tmp_path / "x.npz", **{**breast, "val_images": breast["val_images"][:, :, :20]})
    return str(tmp_path / "x.npz"), "val_images has shape \\(78, 28, 20\\); expected"


@pytest.mark.parametrize("case", [_bad_corrupt, _bad_no_images, _bad_empty_class, _bad_split_lacks_class,
                                  _bad_csv_no_path, _bad_csv_missing_files, _bad_tiny_split, _bad_npz_keys,
                                  _bad_npz_dtype, _bad_npz_shape])
def test_bad_input_is_one_line_naming_the_problem(case, tmp_path, breast):
    source, pattern = case(tmp_path, breast)
    with pytest.raises(UserError, match=pattern) as e:
        data.load_split(source, "train")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / ".medssl-cache") or not any(
        f.endswith(".npz") for f in os.listdir(tmp_path / ".medssl-cache"))


# ---------------------------------------------------------------- through the scripts (in this process:
# their command lines, without paying torch's import once per run on a busy machine)
def run_script(module, *argv):
    """Run `module`.main() with this command line as cli.run_main does; returns the exit code."""
    import sys
    saved = sys.argv
    sys.argv = [module.__name__ + ".py", *map(str, argv)]
    try:
        from common import cli
        cli.run_main(module.main)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved


def test_evaluate_on_a_png_folder_matches_the_medmnist_flag(real_root, layouts, tmp_path, capsys):
    import evaluate
    aucs = {}
    for name, source in (("flag", "breastmnist"), ("folder", layouts / "split")):
        assert run_script(evaluate, "--data", source, "--data-root", real_root, "--init", "random",
                          "--mode", "linear_probe", "--out", tmp_path / name) == 0
        result = json.load(open(tmp_path / name / "metrics.json"))
        aucs[name] = result["mean"]["auc"]
        # names and hash from the dataset itself: medmnist's names for the flag, the folders' for the PNGs
        info = data.describe(str(source), 28, real_root)
        assert result["class_names"] == list(info.class_names) and result["data_hash"] == info.hash
    assert result["class_names"] == list(CLASSES) and result["positive_class"]["name"] == "1_benign"
    assert 0 <= aucs["flag"] <= 1
    # the same images and labels, read class by class: the same probe up to the solver's summation order
    assert aucs["folder"] == pytest.approx(aucs["flag"], abs=1e-3)


def test_unlabeled_folder_pretrains_and_its_checkpoint_evaluates_but_it_cannot_be_evaluated(real_root, breast,
                                                                                             tmp_path, capsys):
    import evaluate
    import pretrain_byol
    os.makedirs(tmp_path / "flat")
    for i, x in enumerate(breast["train_images"][:64]):
        Image.fromarray(x).save(tmp_path / "flat" / f"{i:03d}.png")
    run = tmp_path / "byol"
    assert run_script(pretrain_byol, "--data", tmp_path / "flat", "--epochs", "1", "--max-steps", "1",
                      "--batch-size", "32", "--projector-hidden", "32", "--predictor-hidden", "32", "--out", run) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert run_script(evaluate, "--ckpt", run / "checkpoint.pt", "--data", "breastmnist", "--data-root", real_root,
                      "--mode", "knn", "--out", tmp_path / "eval") == 0
    assert 0 <= json.load(open(tmp_path / "eval" / "metrics.json"))["mean"]["auc"] <= 1
    capsys.readouterr()
    assert run_script(evaluate, "--data", tmp_path / "flat", "--init", "random", "--out", tmp_path / "no") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unlabeled" in err and "class" in err
    assert not os.path.exists(tmp_path / "no")


def test_data_benchmark_runs_and_reports_positive_figures(tmp_path):
    import math
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_data
    figures = bench_data.main(["--n", "40", "--source-size", "32", "--processes", "1", "--train-steps", "1",
                               "--out", str(tmp_path / "d.json")])
    rates = [v for k, v in figures.items() if k.endswith(("_per_s", "_s"))]
    assert len(rates) >= 7 and all(math.isfinite(v) and v > 0 for v in rates)
    assert {"byol_train_own_folder_28px_images_per_s", "byol_train_breastmnist_flag_28px_images_per_s"} <= set(figures)
    assert figures["cached_224px_train_split_images"] == 32 and json.load(open(tmp_path / "d.json")) == figures
