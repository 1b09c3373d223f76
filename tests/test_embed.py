"""embed.py: its features are the encoder's own, computed here directly (eval mode, the pretraining's
input scaling), each row tied to its split, index, label and file; the CSV holds the npz's numbers; the
map has one point per row (or per sampled row) and a vector PDF; bad flags are one line."""
import copy
import csv
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import embed
from common import cli, models, precision
from common.errors import UserError
from conftest import run_cli

N = (20, 8, 8)  # train, val, test images of the synthetic file


@pytest.fixture
def ckpt(tmp_path):
    """A pretraining checkpoint (the keys embed.py reads) of a 1-channel small-stem ResNet-18 whose
    BatchNorm running statistics are far from the batch's own: eval mode changes the features."""
    torch.manual_seed(0)
    encoder = models.build_encoder("resnet18", "small", 1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "checkpoint.pt"
    torch.save({"encoder": encoder.state_dict(), "epoch": 2,
                "meta": {"format": "medssl", "format_version": models.FORMAT_VERSION, "method": "byol",
                         "arch": "resnet18", "stem": "small", "in_chans": 1, "input_scaling": models.INPUT_SCALING,
                         "args": {"size": 28, "epochs": 2}}}, path)
    return str(path), encoder.eval()


def direct_features(encoder, images):
    """The encoder's features of uint8 (N, H, W) gray images, scaled as models.INPUT_SCALING says."""
    x = torch.from_numpy(images).float()[:, None] / 255
    with torch.no_grad():
        return encoder((x - 0.5) / 0.5).numpy()


def run_embed(monkeypatch, *flags):
    monkeypatch.setattr("sys.argv", ["embed.py", *map(str, flags)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    embed.main()


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    feats = np.array([[float(r[k]) for k in r if k.startswith("f") and k[1:].isdigit()] for r in rows], np.float32)
    return rows, feats


def test_the_features_are_the_encoders_in_eval_mode_row_by_row_and_the_csv_holds_them(
        synthetic, ckpt, tmp_path, monkeypatch, fresh_state):
    root = synthetic("breastmnist", n=N)
    path, encoder = ckpt
    out = tmp_path / "emb"
    run_embed(monkeypatch, "--data", "breastmnist", "--data-root", root, "--ckpt", path, "--out", out,
              "--precision", "fp32", "--map-method", "tsne", "--batch-size", 7)
    with np.load(out / "embeddings.npz") as z:
        got = {k: z[k] for k in z.files}
    with np.load(os.path.join(root, "breastmnist.npz")) as z:
        images = np.concatenate([z[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([z[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    want = direct_features(encoder, images)
    assert got["features"].dtype == np.float32 and got["features"].shape == (sum(N), 512)
    np.testing.assert_allclose(got["features"], want, atol=1e-5, rtol=0)
    with torch.no_grad():  # in training mode (batch statistics) the features would differ
        batch_stats = copy.deepcopy(encoder).train()(torch.from_numpy(images).float()[:, None] / 127.5 - 1)
    assert not np.allclose(batch_stats.numpy(), want, atol=1e-3)
    # bit for bit what evaluate.py's linear probe and kNN compute (models.features, the run's Precision) in
    # batches of the same size (another size may round differently, ~1e-6)
    fp32 = precision.resolve("fp32", "cpu", 28)
    fp32.prepare(encoder, "cpu", 1, 28)
    evaluated = [models.features(encoder, torch.from_numpy(split)[:, None], 1, batch_size=7, precision=fp32)
                 for split in np.split(images, np.cumsum(N)[:-1])]
    np.testing.assert_array_equal(got["features"], torch.cat(evaluated).numpy())
    assert got["labels"].tolist() == labels.tolist()
    assert got["split"].tolist() == ["train"] * N[0] + ["val"] * N[1] + ["test"] * N[2]
    assert got["index"].tolist() == [*range(N[0]), *range(N[1]), *range(N[2])]
    assert set(got["file"].tolist()) == {""}  # an npz's images have no files: split and index name them
    assert got["class_names"].tolist() == ["malignant", "normal, benign"]
    assert str(got["input_scaling"]) == models.INPUT_SCALING

    rows, feats = read_csv(out / "embeddings.csv")
    np.testing.assert_array_equal(feats, got["features"])  # 9 significant digits: float32 exactly
    assert [r["split"] for r in rows] == got["split"].tolist()
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert rows[1]["class"] == "normal, benign" and rows[0]["file"] == ""

    # the map: one point per row, a 300 dpi PNG and a vector PDF
    with np.load(out / "map.npz") as z:
        assert z["xy"].shape == (sum(N), 2) and np.isfinite(z["xy"]).all() and z["row"].tolist() == list(range(sum(N)))
    assert open(out / "map.pdf", "rb").read(5) == b"%PDF-"
    assert round(Image.open(out / "map.png").info["dpi"][0]) == 300


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_rows_of_own_images_name_their_files_and_match_those_files_pixels(ckpt, tmp_path, monkeypatch, fresh_state,
                                                                          layout):
    path, encoder = ckpt
    rng = np.random.default_rng(1)
    data_dir, listed = tmp_path / "images", []
    for split, per_class in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("benign", "tumour"):
            for i in range(per_class):
                rel = f"{split}/{cls}/{cls}_{i}.png" if layout == "folder" else f"all/{split}_{cls}_{i}.png"
                (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(data_dir / rel)
                listed.append((rel, cls, split))
    source = data_dir
    if layout == "csv":  # rows out of order: the table must follow the data, not the listing's order
        source = data_dir / "manifest.csv"
        with open(source, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *listed[::-1]])
    out = tmp_path / "emb"
    run_embed(monkeypatch, "--data", source, "--ckpt", path, "--out", out, "--precision", "fp32", "--no-map",
              "--cache-dir", tmp_path / "cache")
    with np.load(out / "embeddings.npz") as z:
        got = {k: z[k] for k in z.files}
    assert len(got["file"]) == len(listed) and not os.path.exists(out / "map.png")
    target = "test/tumour/tumour_1.png" if layout == "folder" else "all/test_tumour_1.png"
    row = got["file"].tolist().index(target)
    assert (got["split"][row], got["labels"][row], got["class_names"][got["labels"][row]]) == ("test", 1, "tumour")
    pixels = np.array(Image.open(data_dir / target))[None]
    np.testing.assert_allclose(got["features"][row], direct_features(encoder, pixels)[0], atol=1e-5, rtol=0)
    # every row: its file's class folder / manifest row gives its label and split
    truth = {rel: (cls, split) for rel, cls, split in listed}
    assert all(truth[f] == (got["class_names"][y], s) for f, y, s in zip(got["file"], got["labels"], got["split"]))
    rows, feats = read_csv(out / "embeddings.csv")
    assert [r["file"] for r in rows] == got["file"].tolist() and rows[row]["class"] == "tumour"
    np.testing.assert_array_equal(feats, got["features"])


def test_the_map_of_a_capped_sample_says_so_and_only_the_table_has_every_row(synthetic, tmp_path, monkeypatch,
                                                                            fresh_state):
    root = synthetic("breastmnist", n=N)
    out = tmp_path / "emb"
    run_embed(monkeypatch, "--data", "breastmnist", "--data-root", root, "--init", "random", "--stem", "small",
              "--split", "test", "--out", out, "--map-method", "tsne", "--map-max-points", 5, "--seed", 3)
    with np.load(out / "embeddings.npz") as z:
        assert len(z["features"]) == N[2] and set(z["split"].tolist()) == {"test"}
        feats = z["features"]
    # a random init is the one evaluate.py draws for its seed: seeded, then built; gray repeated to RGB
    cli.seed_everything(3)
    encoder = models.build_encoder("resnet18", "small", 3).eval()
    with np.load(os.path.join(root, "breastmnist.npz")) as z:
        images = np.repeat(z["test_images"][:, None], 3, axis=1)
    with torch.no_grad():
        np.testing.assert_allclose(feats, encoder(torch.from_numpy(images).float() / 127.5 - 1).numpy(), atol=1e-5,
                                   rtol=0)
    with np.load(out / "map.npz") as z:
        rows = z["row"]
        assert z["xy"].shape == (5, 2) and len(set(rows.tolist())) == 5 and rows.max() < N[2]
        assert str(z["method"]) == "tsne"
    assert open(out / "map.pdf", "rb").read(5) == b"%PDF-"
    title = Image.open(out / "map.png").info["Title"]
    assert "t-SNE of random-init resnet18 features" in title and "test split" in title
    assert "a random sample of 5 of 8 images (seed 3)" in title


def test_parquet_holds_the_same_table(synthetic, tmp_path, monkeypatch, fresh_state):
    pq = pytest.importorskip("pyarrow.parquet")
    root = synthetic("breastmnist", n=N)
    out = tmp_path / "emb"
    run_embed(monkeypatch, "--data", "breastmnist", "--data-root", root, "--init", "random", "--stem", "small",
              "--split", "val", "--out", out, "--format", "parquet", "--no-map")
    table = pq.read_table(out / "embeddings.parquet").to_pydict()
    with np.load(out / "embeddings.npz") as z:
        np.testing.assert_array_equal(np.stack([table[f"f{j}"] for j in range(512)], 1), z["features"])
        assert table["label"] == z["labels"].tolist() and table["split"] == ["val"] * N[1]
        assert table["class"] == [z["class_names"][y] for y in z["labels"]]


def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, fresh_state):
    r = run_cli("embed.py", "--split", "everything")
    assert r.returncode == 2 and r.stderr.startswith("error: --split: invalid choice")
    assert len(r.stderr.splitlines()) == 1
    out = tmp_path / "o"
    for flags, line in ((("--ckpt", "x.pt", "--init", "random"), "error: give --ckpt or --init, not both"),
                        (("--format", "parquet"), "pip install pyarrow")):
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
        monkeypatch.setattr("sys.argv", ["embed.py", *flags, "--out", str(out)])
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(embed.main)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and line in err and len(err.splitlines()) == 1
        assert not out.exists()  # refused before the run directory


def test_unlabeled_images_are_embedded_as_one_train_split_with_their_files(ckpt, tmp_path, monkeypatch, fresh_state):
    path, encoder = ckpt
    rng = np.random.default_rng(2)
    pixels = {f"u{i}.png": rng.integers(0, 256, (28, 28), dtype=np.uint8) for i in range(6)}
    (tmp_path / "flat").mkdir()
    for name, x in pixels.items():
        Image.fromarray(x).save(tmp_path / "flat" / name)
    flags = ("--data", tmp_path / "flat", "--ckpt", path, "--precision", "fp32", "--no-map",
             "--cache-dir", tmp_path / "cache")
    with pytest.raises(UserError, match="unlabeled images, all in the train split"):
        run_embed(monkeypatch, *flags, "--split", "test", "--out", tmp_path / "no")
    run_embed(monkeypatch, *flags, "--out", tmp_path / "emb")
    with np.load(tmp_path / "emb" / "embeddings.npz") as z:
        assert "labels" not in z.files and set(z["split"].tolist()) == {"train"} and str(z["task"]) == "unlabeled"
        want = direct_features(encoder, np.stack([pixels[f] for f in z["file"]]))
        np.testing.assert_allclose(z["features"], want, atol=1e-5, rtol=0)
    assert open(tmp_path / "emb" / "embeddings.csv").readline().startswith("split,index,file,f0,")
