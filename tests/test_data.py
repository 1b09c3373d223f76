import os
import shutil

import numpy as np
import pytest
import torch

from common import data
from common.errors import UserError


def test_real_files_load_with_right_shapes_and_labels(real_root):
    expected = {"train": 4708, "val": 524, "test": 624}
    for split, n in expected.items():
        s = data.load_split("pneumoniamnist", split, 28, real_root)
        assert s.images.shape == (n, 1, 28, 28) and s.images.dtype == torch.uint8
        assert s.labels.shape == (n,) and set(s.labels.tolist()) == {0, 1}
        assert s.task == "binary-class" and s.n_classes == 2
        assert s.info.grouping is None  # MedMNIST files hold no patient ids
    breast64 = data.load_split("breastmnist", "train", 64, real_root)
    assert breast64.images.shape == (546, 1, 64, 64)
    # labels as medmnist stores them: pneumonia is the majority class of the train split
    with np.load(os.path.join(real_root, "pneumoniamnist.npz")) as npz:
        assert np.array_equal(data.load_split("pneumoniamnist", "test", 28, real_root).labels.numpy(),
                              npz["test_labels"][:, 0])
    assert s.labels.float().mean() > 0.5


def test_md5_is_checked_and_tampered_or_truncated_files_are_refused(real_root, tmp_path):
    assert data.locate("breastmnist", 28, real_root)  # genuine file passes
    tampered = tmp_path / "breastmnist.npz"
    shutil.copy(os.path.join(real_root, "breastmnist.npz"), tampered)
    with open(tampered, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="modified or truncated"):
        data.load_split("breastmnist", "train", 28, str(tmp_path))
    with open(tampered, "wb") as f:  # truncated
        f.write(open(os.path.join(real_root, "breastmnist.npz"), "rb").read()[:5000])
    with pytest.raises(UserError, match="modified or truncated"):
        data.load_split("breastmnist", "train", 28, str(tmp_path))


def test_missing_file_offline_is_one_line_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(UserError) as e:
        data.load_split("dermamnist", "train", 64, str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "dermamnist_64.npz" in msg and str(tmp_path) in msg and "--data-root" in msg


def test_root_comes_from_flag_then_env_then_medmnist_default(monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", "/from/env")
    assert data.data_root("/from/flag") == "/from/flag"
    assert data.data_root(None) == "/from/env"
    monkeypatch.delenv("MEDMNIST_ROOT")
    assert data.data_root(None).endswith(".medmnist")


def test_unknown_flag_and_size_are_refused():
    with pytest.raises(UserError, match="pneumoniamnist"):  # the valid flags are listed
        data.locate("pneumoniamnsit", 28)
    with pytest.raises(UserError, match="--size 32"):
        data.locate("pneumoniamnist", 32)
    assert "organmnist3d" not in data.FLAGS_2D and "chestmnist" in data.FLAGS_2D and len(data.FLAGS_2D) == 12


def test_task_types_channels_and_multilabel(synthetic):
    root = synthetic("dermamnist", channels=3, n_classes=7)
    derma = data.load_split("dermamnist", "train", 28, root)
    assert derma.images.shape == (40, 3, 28, 28) and derma.task == "multi-class" and derma.n_classes == 7
    with pytest.raises(UserError, match="RGB"):
        data.load_split("dermamnist", "train", 28, root, in_chans=1)
    root = synthetic("chestmnist", n_labels=14)
    chest = data.load_split("chestmnist", "val", 28, root)
    assert chest.labels.shape == (10, 14) and chest.task.startswith("multi-label") and chest.n_classes == 14
    root = synthetic("retinamnist", channels=3, n_classes=5, size=64)
    retina = data.load_split("retinamnist", "test", 64, root)
    assert retina.task == "ordinal-regression" and retina.images.shape == (12, 3, 64, 64)


def test_pretraining_union_takes_train_splits_only_and_mixes_gray_with_rgb(synthetic):
    synthetic("breastmnist")
    root = synthetic("dermamnist", channels=3, n_classes=7)
    images = data.load_pretrain_images("breastmnist,dermamnist", 28, root)
    assert images.shape == (80, 3, 28, 28)  # 40 + 40 train images, gray repeated to RGB
    assert torch.equal(images[0, 0], images[0, 2])


def test_to_input_normalises_and_repeats_gray():
    x = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1)
    y = data.to_input(x, in_chans=3)
    assert y.shape == (2, 3, 1, 1) and y.min() == -1 and y.max() == 1
    assert data.to_input(x, in_chans=1).shape == (2, 1, 1, 1)


# ---------------------------------------------------------------- subsets
LABELS = np.array([0] * 300 + [1] * 100 + [2] * 20)


def test_few_shot_takes_k_per_class_seeded():
    idx = data.few_shot_indices(LABELS, 5, seed=1)
    assert np.bincount(LABELS[idx]).tolist() == [5, 5, 5] and len(set(idx)) == 15
    assert np.array_equal(idx, data.few_shot_indices(LABELS, 5, seed=1))
    assert not np.array_equal(idx, data.few_shot_indices(LABELS, 5, seed=2))
    with pytest.raises(UserError, match="more than class 2 has"):
        data.few_shot_indices(LABELS, 21, seed=0)


def test_label_fraction_is_stratified_and_seeded():
    idx = data.label_fraction_indices(LABELS, 0.1, seed=0)
    assert np.bincount(LABELS[idx]).tolist() == [30, 10, 2]
    assert np.array_equal(idx, data.label_fraction_indices(LABELS, 0.1, seed=0))
    assert not np.array_equal(idx, data.label_fraction_indices(LABELS, 0.1, seed=1))
    assert len(data.label_fraction_indices(LABELS, 1.0, seed=0)) == len(LABELS)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(UserError, match="label-fraction"):
            data.label_fraction_indices(LABELS, bad, seed=0)


def test_undersampling_reaches_the_ratio_and_is_seeded():
    binary = np.array([0] * 147 + [1] * 399)  # BreastMNIST's train split
    idx = data.undersample_indices(binary, 0.4, seed=0)
    counts = np.bincount(binary[idx])
    assert counts[0] == 147 and counts[1] == round(147 * 0.6 / 0.4)  # 60/40, the paper's BreastMNIST split
    assert abs(counts[0] / counts.sum() - 0.4) < 0.002
    assert np.bincount(binary[data.undersample_indices(binary, 0.5, seed=0)]).tolist() == [147, 147]
    three = np.array([0] * 10 + [1] * 50 + [2] * 12)  # multi-class: each larger class capped to 15
    assert np.bincount(three[data.undersample_indices(three, 0.4, seed=0)]).tolist() == [10, 15, 12]
    for bad in (0, 0.6, 1.0):
        with pytest.raises(UserError, match="balance"):
            data.undersample_indices(binary, bad, seed=0)
    assert np.array_equal(idx, data.undersample_indices(binary, 0.4, seed=0))
    assert not np.array_equal(idx, data.undersample_indices(binary, 0.4, seed=3))
