"""A run records what it was made from (provenance.json: each --data source's hash, the encoder file's
sha256 and pretraining epoch, the torchrun processes), and a resume on other inputs is refused in one
line naming the change and the fix, leaving the run directory as it was; the same inputs resume. The
cache of own images is keyed on their content: an image edited in place with its size and mtime kept
is converted again."""
import hashlib
import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli, convert, data, models, pretrain, results, rundir, supervised
from conftest import real_arrays, run_cli, stopping_at_seed
from test_faults import cli_one_line, digest, one_line, parser_of


@pytest.fixture(autouse=True)
def fresh_describe():
    data._resolve.cache_clear()  # each test sees the files as they are now
    yield
    data._resolve.cache_clear()


def edit_in_place(path, write):
    """Change a file's bytes through write(f) and put its mtime back: only the content and ctime differ."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        write(f)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def flip_last_pixel(f):
    f.seek(-1, os.SEEK_END)
    value = f.read(1)[0]
    f.seek(-1, os.SEEK_END)
    f.write(bytes([255 - value]))


def image_folder(root, breast, n):
    """n BreastMNIST train images as a flat folder of PGM files (a fixed size per image: an edited pixel
    keeps the file's size)."""
    os.makedirs(root)
    for i in range(n):
        Image.fromarray(breast[i]).save(os.path.join(root, f"{i:03d}.pgm"))
    return str(root)


@pytest.fixture(scope="module")
def breast():
    return real_arrays("breastmnist.npz")["train_images"]


# ---------------------------------------------------------------- the check itself
def test_the_recorded_world_size_is_checked_and_the_same_inputs_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = vars(cli.parse_args(parser_of("pretrain_byol"), ["--out", out]))
    two = rundir.provenance({"pneumoniamnist": "a" * 32}, encoder="random", world_size=2)
    assert rundir.prepare_run_dir(out, flags, None, inputs=two) is False
    rundir.save_checkpoint({"epoch": 1}, os.path.join(out, "checkpoint.pt"))
    before = digest(out)
    one = rundir.provenance({"pneumoniamnist": "a" * 32}, encoder="random", world_size=1)
    line = one_line(capsys, lambda: rundir.prepare_run_dir(out, flags, None, inputs=one))
    assert "torchrun processes: 2 there, 1 now" in line and "BatchNorm" in line
    assert "run it again with torchrun --nproc-per-node 2" in line and "--overwrite or another --out" in line
    assert digest(out) == before
    assert rundir.prepare_run_dir(out, flags, None, inputs=two) is True  # the same inputs: it resumes
    # and the other way round: a run of one process is not resumed by two
    assert "with one process (no torchrun)" in str(rundir.input_changes(one, two))
    # a record that cannot be read is no pass
    record = os.path.join(out, rundir.PROVENANCE)
    with open(record, "w") as f:
        f.write("{torn")
    assert "provenance.json is unreadable or corrupt" in one_line(
        capsys, lambda: rundir.prepare_run_dir(out, flags, None, inputs=two))
    # a run of an earlier MedSSL records nothing: it resumes, says so, and records the inputs from now on
    os.remove(record)
    capsys.readouterr()
    assert rundir.prepare_run_dir(out, flags, None, inputs=two) is True
    assert "does not record what its finished part was made from" in capsys.readouterr().out
    assert rundir.input_changes(json.load(open(record)), one)


def test_data_and_encoder_changes_are_named_with_short_hashes(tmp_path):
    weights = tmp_path / "enc.pth"
    torch.save({"w": torch.zeros(3)}, weights)
    old = rundir.provenance({"x": "0123456789abcdef" * 2}, encoder=str(weights), epoch=3)
    assert old["encoder"]["sha256"] == rundir.file_sha256(str(weights)) and old["encoder"]["epoch"] == 3
    assert old["encoder"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    torch.save({"w": torch.ones(3)}, weights)
    new = rundir.provenance({"x": "fedcba9876543210" * 2}, encoder=str(weights), epoch=5)
    (data_change, data_fix), (enc_change, enc_fix) = rundir.input_changes(old, new)
    assert data_change == "data x: hash 0123456789ab there, fedcba987654 now"
    assert f"sha256 {old['encoder']['sha256'][:12]} (pretraining epoch 3) there" in enc_change
    assert f"sha256 {new['encoder']['sha256'][:12]} (pretraining epoch 5) now" in enc_change
    assert "restore the data" in data_fix and "restore the encoder file" in enc_fix
    # what one record lacks is not compared (a run of an earlier MedSSL)
    assert rundir.input_changes({"data": old["data"]}, {**old, "world_size": 4}) == []


def test_seeds_scored_on_a_test_split_of_another_size_are_not_pooled(tmp_path, capsys):
    # a run that records no inputs (an earlier MedSSL's) over a folder that grew between seeds
    out = str(tmp_path / "run")
    flags = vars(cli.parse_args(parser_of("evaluate"), ["--out", out]))
    rundir.prepare_run_dir(out, flags, "metrics.json")
    rundir.atomic_write_text(os.path.join(out, "seed_0.json"), json.dumps(
        {"seed": 0, "test": {}, "y_score": [[0.5, 0.5]] * 3, "y_score_dtype": "float32"}))
    before = digest(out)

    def never(seed, log):
        raise AssertionError("no seed runs")
    line = one_line(capsys, lambda: supervised.run_seeds(out, [0, 1], never, np.zeros(5, int), "binary-class", {},
                                                         "t"))
    assert "seed 0 in" in line and "scored on 3 test images and this run's test split has 5" in line
    assert line.endswith("restore the data it was started on, or start again with --overwrite or another --out")
    assert digest(out) == before


# ---------------------------------------------------------------- the cache of own images
def test_an_image_edited_with_its_size_and_mtime_kept_is_converted_again(breast, tmp_path, capsys, monkeypatch):
    source = image_folder(tmp_path / "imgs", breast, 12)
    first = data.describe(source)
    assert "converting 12 images" in capsys.readouterr().out
    # a cache hit reads no image: every stamp is trusted once the files are older than RACY_NS
    monkeypatch.setattr(convert, "RACY_NS", 0)
    read = []
    monkeypatch.setattr(convert, "_sha256", lambda path: read.append(path) or hashlib.sha256(
        open(path, "rb").read()).hexdigest())
    data._resolve.cache_clear()
    assert data.describe(source) == first and read == [] and "converting" not in capsys.readouterr().out
    edited = os.path.join(source, "005.pgm")
    edit_in_place(edited, flip_last_pixel)
    data._resolve.cache_clear()
    second = data.describe(source)
    assert read == [edited]  # only the edited file is read again
    assert "converting 12 images" in capsys.readouterr().out and second.hash != first.hash
    with np.load(second.path) as npz:
        assert npz["train_images"][5, -1, -1] == 255 - breast[5][-1, -1]
    # a file changed within RACY_NS of its hashing is read again next time, whatever its stamp says
    monkeypatch.setattr(convert, "RACY_NS", 10**15)
    data._resolve.cache_clear()
    read.clear()
    assert data.describe(source) == second and len(read) == 12


# ---------------------------------------------------------------- the scripts: pretraining and evaluation
# The refused resume is a CLI process, as a user meets it; the runs before and after it run main() in
# this process (cheaper than a process start-up, as tests/test_resume.py does).
def in_process(script, argv, monkeypatch):
    """script's main() with these flags in this process, which then lets go of the run directory's lock
    (held until a process ends) so that a CLI process can take it."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    try:
        importlib.import_module(script.removesuffix(".py")).main()
    finally:
        fd = rundir._locks.pop(os.path.realpath(argv[argv.index("--out") + 1]), None)
        if fd is not None:
            os.close(fd)


BYOL = ["--epochs", "2", "--max-steps", "1", "--batch-size", "8", "--projector-hidden", "16",
        "--predictor-hidden", "16", "--projector-out", "8", "--aug", "byol"]


def test_pretraining_resumed_on_edited_data_is_refused_and_resumes_on_the_same(breast, tmp_path, monkeypatch, capsys):
    source = image_folder(tmp_path / "imgs", breast, 16)
    out = tmp_path / "run"
    flags = [*BYOL, "--data", source, "--out", str(out)]

    def interrupt(*_):  # Ctrl-C right after the first epoch's checkpoint: an unfinished run
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(pretrain, "plot_log", interrupt)
        with pytest.raises(KeyboardInterrupt):
            in_process("pretrain_byol.py", flags, monkeypatch)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    recorded = (out / "provenance.json").read_text()
    edited = os.path.join(source, "003.pgm")
    original = open(edited, "rb").read()
    edit_in_place(edited, flip_last_pixel)
    before = digest(out)
    line = cli_one_line(run_cli("pretrain_byol.py", *flags))
    assert f"{out} was started on other inputs" in line and f"data {source}: hash " in line
    assert "restore the data it was started on" in line and "--overwrite or another --out" in line
    assert digest(out) == before and (out / "provenance.json").read_text() == recorded
    edit_in_place(edited, lambda f: f.write(original))
    data._resolve.cache_clear()
    capsys.readouterr()
    in_process("pretrain_byol.py", flags, monkeypatch)
    assert "resuming" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def medssl_checkpoint(path, epoch, seed):
    """A pretraining checkpoint as pretrain.train writes it (its encoder and meta), of random weights."""
    torch.manual_seed(seed)
    meta = {"format": "medssl", "format_version": models.FORMAT_VERSION, "method": "byol", "arch": "resnet18",
            "stem": "imagenet", "in_chans": 3, "input_scaling": models.INPUT_SCALING, "args": {"size": 28, "epochs": 9}}
    torch.save({"encoder": models.build_encoder("resnet18", "imagenet", 3).state_dict(), "meta": meta,
                "epoch": epoch}, path)


def test_evaluation_seeds_are_never_pooled_across_encoders(real_root, tmp_path, monkeypatch, capsys):
    import evaluate
    ckpt, out = tmp_path / "checkpoint.pt", tmp_path / "eval"
    medssl_checkpoint(ckpt, epoch=3, seed=0)
    flags = ["--ckpt", str(ckpt), "--data", "breastmnist", "--data-root", real_root, "--mode", "knn", "--seeds", "2",
             "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(evaluate, "run_seed", stopping_at_seed(evaluate.run_seed, 1))  # seed 0 saved, unfinished
        with pytest.raises(KeyboardInterrupt):
            in_process("evaluate.py", flags, monkeypatch)
    seed_0 = (out / "seed_0.json").read_text()
    original = ckpt.read_bytes()
    medssl_checkpoint(ckpt, epoch=5, seed=1)  # another encoder under the same name
    before = digest(out)
    line = cli_one_line(run_cli("evaluate.py", *flags))
    assert f"encoder {ckpt}: sha256 " in line and "(pretraining epoch 3) there" in line
    assert "(pretraining epoch 5) now" in line and "restore the encoder file it was started with" in line
    assert digest(out) == before
    ckpt.write_bytes(original)  # restored: a new mtime, the same content
    pooled = []  # the seeds' records as metrics.json would pool them (its bootstrap CI costs ~5 s here)
    monkeypatch.setattr(results, "write_results", lambda out, header, records, *a, **k: pooled.extend(records))
    capsys.readouterr()
    in_process("evaluate.py", flags, monkeypatch)
    assert "seed 0 finished" in capsys.readouterr().out
    assert [r["seed"] for r in pooled] == [0, 1] and (out / "seed_0.json").read_text() == seed_0
