"""common/supervised.py: the loss and probabilities, precise BN, training with selection on validation
(its NaN guard, its fallback when the validation AUC is undefined), and the seeded repeats through
evaluate.py: per-seed files, resume after SIGKILL, --overwrite, the label-fraction batch size."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from common import data, metrics, models, supervised
from common.errors import UserError
from conftest import REPO, cli_env, run_cli


def _encoder():
    torch.manual_seed(0)
    return models.build_encoder("resnet18", "imagenet", 3)


# ---------------------------------------------------------------- loss and probabilities
def test_binary_loss_is_one_logit_bce_or_two_logit_softmax():
    logits, labels = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    p = torch.sigmoid(logits[:, 0])
    manual = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert torch.allclose(supervised.classification_loss(logits, labels, metrics.BINARY), manual)
    two = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    assert torch.allclose(supervised.classification_loss(two, torch.tensor([1, 0]), metrics.BINARY),
                          -(two.log_softmax(1)[[0, 1], [1, 0]]).mean())
    multi = torch.tensor([[2.0, 0.1, -1.0]])
    assert torch.allclose(supervised.classification_loss(multi, torch.tensor([2]), metrics.MULTI_CLASS),
                          -multi.log_softmax(1)[0, 2])
    ml, ml_labels = torch.tensor([[1.0, -2.0]]), torch.tensor([[1, 0]])
    q = torch.sigmoid(ml)
    assert torch.allclose(supervised.classification_loss(ml, ml_labels, metrics.MULTI_LABEL),
                          -(q[0, 0].log() + (1 - q[0, 1]).log()) / 2)


def test_probabilities_one_logit_binary_as_two_columns_and_eval_mode():
    head = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Dropout(0.9))
    x = torch.randn(700, 3)  # more than one batch of 512
    probs = supervised.probabilities(head, x, metrics.BINARY)
    p1 = torch.sigmoid(head[0](x))[:, 0].detach().numpy()  # dropout off: eval mode
    assert probs.shape == (700, 2) and np.allclose(probs[:, 1], p1, atol=1e-6) and np.allclose(probs.sum(1), 1)
    three = torch.nn.Linear(3, 3)
    assert np.allclose(supervised.probabilities(three, x, metrics.MULTI_CLASS),
                       three(x).softmax(1).detach().numpy(), atol=1e-6)


# ---------------------------------------------------------------- precise BN (moved from test_evaluate_protocols)
def _small_images(n=24, seed=0):
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_precise_bn_sets_running_means_to_the_training_images_mean_and_spares_frozen_stages():
    model = torch.nn.Sequential(_encoder(), torch.nn.Linear(512, 2))
    models.freeze_through(model[0], "stem")
    stem_bn, layer1_bn = model[0].bn1, model[0].layer1[0].bn1
    stem_before = stem_bn.running_mean.clone()
    x = _small_images()
    prepare = lambda im: data.to_input(im, 3)  # noqa: E731
    supervised.recompute_bn_stats(model, x, lambda im: model(prepare(im)), batch_size=8)  # 3 equal batches
    assert torch.equal(stem_bn.running_mean, stem_before)  # frozen stage: untouched
    with torch.no_grad():  # layer1's first BN sees conv1 of the (frozen, eval-mode) stem's output
        enc = model[0].eval()
        h = enc.conv1(prepare(x))
        h = enc.maxpool(enc.relu(enc.bn1(h)))
        expected = model[0].layer1[0].conv1(h).mean(dim=(0, 2, 3))
    assert torch.allclose(layer1_bn.running_mean, expected, atol=1e-5)
    assert layer1_bn.momentum == 0.1  # restored after the cumulative average


def test_precise_bn_never_forms_a_batch_of_one_image():
    """33 images in batches of 16: 16 + 17, not 16 + 16 + 1 (training-mode BN refuses one image at
    layer4's 1x1 maps); the running mean is the mean of the two batches' means."""
    model = torch.nn.Sequential(_encoder(), torch.nn.Linear(512, 2))
    x = _small_images(33, seed=1)
    prepare = lambda im: data.to_input(im, 3)  # noqa: E731
    supervised.recompute_bn_stats(model, x, lambda im: model(prepare(im)), batch_size=16)
    with torch.no_grad():
        h = model[0].conv1(prepare(x))
        expected = (h[:16].mean(dim=(0, 2, 3)) + h[16:].mean(dim=(0, 2, 3))) / 2
    assert torch.allclose(model[0].bn1.running_mean, expected, atol=1e-5)


# ---------------------------------------------------------------- train_select
def _features(n, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return supervised.Examples(x + labels[:, None].float(), labels)


def test_train_select_keeps_the_best_epoch_and_logs_one_record_per_epoch():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    train, val = _features(32, torch.arange(32) % 2), _features(16, torch.arange(16) % 2, seed=1)
    records = []
    chosen = supervised.train_select(head, torch.optim.SGD(head.parameters(), lr=0.5), train, val,
                                     metrics.BINARY, 0, supervised.Schedule(epochs=4, batch_size=8), head,
                                     log=records.append)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    aucs = [r["val_auc"] for r in records]
    assert chosen.best_epoch == int(np.argmax(aucs)) and chosen.selected_on == "val_auc"
    final = metrics.auc(val.labels.numpy(), supervised.probabilities(head, val.inputs, metrics.BINARY), metrics.BINARY)
    assert round(final, 5) == aucs[chosen.best_epoch]  # the best epoch's weights are loaded back


def test_val_every_validates_every_nth_and_the_last_epoch_and_keeps_the_best_of_those():
    """The same seeded training with --val-every 3 over 7 epochs: validation after epochs 3, 6 and 7
    only, with the AUCs the every-epoch run had there, and the best of those three kept."""
    def run(val_every):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 2)
        train, val = _features(32, torch.arange(32) % 2), _features(16, torch.arange(16) % 2, seed=1)
        records = []
        chosen = supervised.train_select(head, torch.optim.SGD(head.parameters(), lr=0.5), train, val,
                                         metrics.BINARY, 0, supervised.Schedule(epochs=7, batch_size=8,
                                                                                val_every=val_every),
                                         head, log=records.append)
        return chosen, records
    every, all_records = run(1)
    sparse, records = run(3)
    assert [r["epoch"] for r in records] == list(range(7))  # one record per epoch still
    validated = [r["epoch"] for r in records if "val_auc" in r]
    assert validated == [2, 5, 6]
    assert [r["val_auc"] for r in records if "val_auc" in r] == [all_records[e]["val_auc"] for e in validated]
    aucs = {e: all_records[e]["val_auc"] for e in validated}
    assert sparse.best_epoch == max(validated, key=lambda e: (aucs[e], -e))
    assert "not validated" in supervised.epoch_line(records[0]) and "none yet" in supervised.epoch_line(records[0])


def test_an_undefined_validation_auc_selects_on_the_validation_loss():
    """A validation split of one class has no AUC: the epoch of lowest validation loss is kept."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    train, val = _features(32, torch.arange(32) % 2), _features(8, torch.zeros(8, dtype=torch.long), seed=1)
    records = []
    chosen = supervised.train_select(head, torch.optim.SGD(head.parameters(), lr=0.5), train, val,
                                     metrics.BINARY, 0, supervised.Schedule(epochs=3, batch_size=8), head,
                                     log=records.append)
    losses = [r["val_loss"] for r in records]
    assert all(r["val_auc"] is None for r in records)
    assert chosen.selected_on == "val_loss" and chosen.val_auc is None and chosen.best_epoch == int(np.argmin(losses))
    assert chosen.info() == {"val_auc": None, "best_epoch": chosen.best_epoch, "selected_on": "val_loss"}
    assert "AUC undefined" in supervised.epoch_line({**records[0], "seed": 0})


def test_a_diverging_loss_is_one_line_naming_seed_epoch_and_lr():
    head = torch.nn.Linear(4, 2)
    train, val = _features(16, torch.arange(16) % 2), _features(8, torch.arange(8) % 2)
    calls = []

    def forward(x):  # finite for the first three steps, then NaN
        calls.append(1)
        return head(x) * (float("nan") if len(calls) > 3 else 1.0)
    message = r"loss became nan at seed 7, epoch 1, step 1 of the epoch; lower --lr \(now 0.1\)"
    with pytest.raises(UserError, match=message):
        supervised.train_select(head, torch.optim.SGD(head.parameters(), lr=0.1), train, val, metrics.BINARY, 7,
                                supervised.Schedule(epochs=3, batch_size=8), head, forward_train=forward)


def test_lr_1e9_ends_in_the_nan_guard_not_a_traceback(real_root, tmp_path):
    r = run_cli("evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "finetune",
                "--epochs", "2", "--max-steps", "2", "--lr", "1e9", "--out", str(tmp_path / "r"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert "seed 0, epoch 0" in lines[0] and "lower --lr (now 1e+09)" in lines[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


# ---------------------------------------------------------------- the label-fraction batch size
def test_label_fraction_batch_size_comes_from_the_subset_drawn(real_root, tmp_path):
    """BreastMNIST at 1.6%: round(0.016 * 546) = 9, but the classes keep 2 + 6 = 8 images."""
    base = ["evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--label-fraction", "0.016"]
    r = run_cli(*base, "--mode", "knn", "--out", str(tmp_path / "knn"))  # needs no batch size at all
    assert r.returncode == 0, r.stderr[-1000:]
    assert yaml.safe_load((tmp_path / "knn" / "args.yaml").read_text())["batch_size"] is None
    r = run_cli(*base, "--mode", "finetune", "--epochs", "1", "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr[-1000:]
    assert yaml.safe_load((tmp_path / "ft" / "args.yaml").read_text())["batch_size"] == 8
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["n"] == 1


# ---------------------------------------------------------------- seeded repeats: resume and --overwrite
SGD = ["evaluate.py", "--data", "breastmnist", "--mode", "linear_probe", "--probe", "sgd", "--epochs", "3",
       "--seeds", "3", "--seed", "5"]


def _start(*args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _ready(ready):
    try:
        return ready()
    except FileNotFoundError:  # e.g. args.yaml between --overwrite moving the old run aside and the new one
        return False


def _kill_when(proc, ready, timeout=240):
    """SIGKILL `proc` as soon as ready() holds (a file it reads not there yet: not yet); fails if it
    ended first."""
    deadline = time.time() + timeout
    while not _ready(ready):
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-1000:]}"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _without_out(result):
    return {**result, "args": {k: v for k, v in result["args"].items() if k != "out"}}


def test_a_killed_run_resumes_at_the_next_seed_with_the_same_results(real_root, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run_cli(*SGD, "--data-root", real_root, "--out", str(whole))
    assert r.returncode == 0, r.stderr[-1000:]
    # live feedback: a line per epoch of every seed
    assert [line.split(":")[0] for line in r.stdout.splitlines() if " epoch " in line] == \
        [f"seed {s} epoch {e}/3" for s in (5, 6, 7) for e in (1, 2, 3)]

    proc = _start(*SGD, "--data-root", real_root, "--out", str(cut))
    _kill_when(proc, lambda: (cut / "seed_5.json").exists())
    assert not (cut / "metrics.json").exists() and not (cut / "seed_7.json").exists()
    r = run_cli(*SGD, "--data-root", real_root, "--out", str(cut))  # the same command again
    assert r.returncode == 0, r.stderr[-1000:]
    assert "resuming" in r.stdout and "seed 5 epoch" not in r.stdout  # seed 5 was not redone

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert _without_out(a) == _without_out(b)
    for key in ("y_score_per_seed", "seeds", "y_true"):
        assert np.array_equal(np.load(whole / "predictions.npz")[key], np.load(cut / "predictions.npz")[key])
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    keys = [(e["seed"], e["epoch"]) for e in log]
    assert sorted(keys) == [(s, e) for s in (5, 6, 7) for e in range(3)]  # each once: no duplicates
    assert [e["val_auc"] for e in log] == [json.loads(line)["val_auc"]
                                           for line in (whole / "log.jsonl").read_text().splitlines()]


def test_overwrite_clears_the_old_outputs_before_it_writes_the_new_args(real_root, tmp_path):
    out = tmp_path / "run"
    r = run_cli("evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "knn", "--out", str(out))
    assert r.returncode == 0, r.stderr[-1000:]
    old = {p.name for p in out.iterdir()}
    assert {"metrics.json", "seed_0.json", "predictions.npz", "roc.png", "confusion.png"} <= old

    # a bad input of the re-run is refused before anything is removed
    r = run_cli("evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "knn", "--overwrite",
                "--init", str(tmp_path / "missing.pth"), "--out", str(out))
    assert r.returncode == 2 and {p.name for p in out.iterdir()} == old

    # killed as soon as its new args.yaml is there: no old output left beside it
    proc = _start(*SGD, "--data-root", real_root, "--overwrite", "--out", str(out))
    _kill_when(proc, lambda: "probe: sgd" in (out / "args.yaml").read_text())
    left = {p.name for p in out.iterdir()}
    assert "metrics.json" not in left and not left & {"seed_0.json", "predictions.npz", "roc.png", "confusion.png"}
    finished = subprocess.run(["bash", "-c", f"source scripts/reproduce_lib.sh; finished {out}"], cwd=REPO)
    assert finished.returncode == 1  # the reproduce scripts would run it again, not skip it


def test_run_seeds_saves_each_seed_and_cuts_back_the_log_of_an_unfinished_one(tmp_path):
    """In process: seed 0 finished (its file), seed 1 killed mid-way (log lines, a torn last line,
    no file): the next run_seeds keeps seed 0, redoes seed 1 once."""
    y_true = np.array([0, 1, 0, 1])
    runs = []

    def run_seed(seed, log):
        runs.append(seed)
        log({"seed": seed, "epoch": 0, "epochs": 1, "loss": 0.5, "val_auc": 0.75, "best_epoch": 0})
        return supervised.SeedRun(np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]], dtype=np.float32),
                                  {"val_auc": 0.75, "best_epoch": 0})
    out = str(tmp_path)
    seeds = [0, 1]
    first = supervised.run_seeds(out, seeds[:1], run_seed, y_true, metrics.BINARY, {"args": {}}, "t", epochs_per_seed=1)
    assert json.loads((tmp_path / "seed_0.json").read_text())["test"] == first["per_seed"][0]["test"]
    os.remove(tmp_path / "metrics.json")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"seed": 1, "epoch": 0, "loss": 9.0}) + '\n{"seed": 1, "ep')
    runs.clear()
    result = supervised.run_seeds(out, seeds, run_seed, y_true, metrics.BINARY, {"args": {}}, "t", epochs_per_seed=1)
    assert runs == [1] and [r["seed"] for r in result["per_seed"]] == [0, 1]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["seed"], e["loss"]) for e in log] == [(0, 0.5), (1, 0.5)]
    assert np.load(tmp_path / "predictions.npz")["y_score"].dtype == np.float32


# ---------------------------------------------------------------- reporting: positive class, TensorBoard
def test_positive_class_by_name_and_tensorboard_scalars_equal_the_log(real_root, tmp_path):
    from sklearn.metrics import f1_score, precision_score, recall_score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "r"
    r = run_cli("evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "finetune",
                "--epochs", "2", "--max-steps", "2", "--head-epochs", "1", "--seeds", "2",
                "--positive-class", "Malignant", "--tensorboard", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr[-1000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["class_names"] == ["malignant", "normal, benign"]  # the dataset's own names
    assert result["data_hash"] == data.describe("breastmnist", 28, real_root).hash
    assert result["positive_class"] == {"index": 0, "name": "malignant"}
    predictions = np.load(out / "predictions.npz")
    for record, scores in zip(result["per_seed"], predictions["y_score_per_seed"]):
        y, pred = predictions["y_true"].reshape(-1), scores.argmax(axis=1)
        assert record["test"]["precision"] == pytest.approx(precision_score(y, pred, pos_label=0, zero_division=0))
        assert record["test"]["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=0))
        assert record["test"]["specificity"] == pytest.approx(recall_score(y, pred, pos_label=1))
        assert record["test"]["f1"] == pytest.approx(f1_score(y, pred, pos_label=0, zero_division=0))

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    records = [rec for rec in records if "epoch" in rec]
    assert len(records) == 2 * (2 + 1)  # 2 seeds x (1 head epoch + 2 epochs)
    expected = {}
    for rec in records:
        prefix = f"seed{rec['seed']}/" + (f"{rec['phase']}/" if rec.get("phase") else "")
        for key in ("loss", "val_auc", "lr"):
            expected.setdefault(prefix + key, []).append((rec["epoch"], rec[key]))
    assert set(expected) <= set(events.Tags()["scalars"]) and "seed1/val_auc" in expected
    for tag, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in values], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), tag  # float32 events


@pytest.mark.parametrize("value, needle", [("benign", "positive class 'benign' is not a class"),
                                           ("2", "choose 0 ('malignant'), 1 ('normal, benign')")])
def test_a_positive_class_the_task_lacks_is_one_line_and_writes_nothing(real_root, tmp_path, value, needle):
    r = run_cli("evaluate.py", "--data", "breastmnist", "--data-root", real_root, "--mode", "knn",
                "--positive-class", value, "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert r.stderr.startswith("error: --positive-class: ") and not (tmp_path / "r").exists()


def test_positive_class_is_for_binary_tasks_only():
    info = data.DatasetInfo("x", "npz", "multi-class", ("a", "b", "c"), 1, 28, "h", "x.npz")
    assert supervised.positive_class("1", info) == 1  # the default: ignored
    with pytest.raises(UserError, match="--positive-class applies to binary tasks"):
        supervised.positive_class("a", info)
    binary = data.DatasetInfo("x", "npz", "binary-class", ("malignant", "benign"), 1, 28, "h", "x.npz")
    assert supervised.positive_class("0", binary) == 0 and supervised.positive_class("BENIGN", binary) == 1


