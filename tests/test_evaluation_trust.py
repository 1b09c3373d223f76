"""What makes an evaluation's answer trustworthy at its defaults: the checkpoint's pretraining size and
encoder become the evaluation's, a model file of another shape is refused in one line, every seed's
labelled subset is said and saved, class weights are scikit-learn's, the SGD probe measures features
rather than its learning rate, and the default fine-tune does not collapse at small label fractions
on the real files and on the same images as class folders."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

import evaluate
from common import data, metrics, models, supervised
from common.errors import UserError
from conftest import REPO, cli_env


def write_checkpoint(path, size=64, arch="resnet18", stem="imagenet", in_chans=1, epoch=3, epochs=3, **meta):
    """A pretraining checkpoint as common/pretrain.py writes it (only the keys evaluation reads)."""
    encoder = models.build_encoder(arch, stem, in_chans)
    torch.save({"encoder": encoder.state_dict(), "epoch": epoch,
                "meta": {"format": "medssl", "format_version": models.FORMAT_VERSION, "method": "byol",
                         "arch": arch, "stem": stem, "in_chans": in_chans, "input_scaling": models.INPUT_SCALING,
                         "args": {"size": size, "epochs": epochs}, **meta}}, path)
    return str(path)


def resolve(*flags):
    return evaluate.resolve_args(evaluate.get_args_parser().parse_args(list(flags)))


def seed_run(root, *flags, seed=0):
    """evaluate.run_seed in this process (no start-up of a script): one seed's SeedRun."""
    args = resolve(*flags, "--data-root", root, "--out", os.devnull)
    splits = {s: data.load_split(args.data, s, args.size, root, "cpu", args.in_chans) for s in ("train", "val", "test")}
    if args.batch_size is None and evaluate.uses_batches(args):
        args.batch_size = supervised.default_batch_size(len(evaluate.training_indices(args, splits["train"].labels, 0)))
    arithmetic = evaluate.resolve_precision(args, "cpu", splits["train"].images)
    return evaluate.run_seed(args, seed, splits, None, torch.device("cpu"), lambda record: None, arithmetic), splits


def evaluate_cli(*flags, root):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *flags], capture_output=True, text=True,
                          env=cli_env(MEDMNIST_ROOT=root), cwd=REPO)


# ---------------------------------------------------------------- checkpoint and evaluation agree
def test_the_checkpoints_pretraining_size_and_encoder_become_the_defaults(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "checkpoint.pt", size=64, in_chans=1)
    args = resolve("--ckpt", ckpt, "--out", str(tmp_path / "a"))
    assert (args.size, args.in_chans, args.arch, args.stem) == (64, 1, "resnet18", "imagenet")
    assert "evaluating at 64 px" in capsys.readouterr().out
    args = resolve("--ckpt", ckpt, "--size", "28", "--out", str(tmp_path / "b"))  # asked for: used, with a warning
    out = capsys.readouterr().out
    assert args.size == 28 and "warning:" in out and "pretrained on 64 px" in out and len(out.strip().splitlines()) == 1
    assert resolve("--init", "random", "--out", str(tmp_path / "c")).size == 28  # no checkpoint: 28
    with pytest.raises(UserError, match="in_chans 3"):
        resolve("--ckpt", ckpt, "--in-chans", "3", "--out", str(tmp_path / "d"))


@pytest.mark.parametrize("meta, words", [
    ({"format_version": models.FORMAT_VERSION + 1}, "newer than this MedSSL"),
    ({"stem": "\x1b]0;pwned\x07tiny"}, "stem"),
    ({"input_scaling": "x / 127.5 - 1"}, "inputs scaled as"),
])
def test_a_checkpoint_this_code_cannot_read_right_is_refused_in_one_escaped_line(tmp_path, meta, words):
    ckpt = write_checkpoint(tmp_path / "checkpoint.pt", **meta)
    with pytest.raises(UserError, match=words) as e:
        resolve("--ckpt", ckpt, "--out", str(tmp_path / "run"))
    assert "\x1b" not in str(e.value) and "\x07" not in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_holding_a_bare_tensor_or_a_meta_of_another_kind_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="bare Tensor"):
        resolve("--ckpt", str(tmp_path / "tensor.pt"), "--out", str(tmp_path / "a"))
    torch.save({"meta": [1, 2], "encoder": {}}, tmp_path / "list_meta.pt")
    with pytest.raises(UserError, match="not a MedSSL checkpoint"):
        resolve("--ckpt", str(tmp_path / "list_meta.pt"), "--out", str(tmp_path / "b"))


def test_a_medssl_checkpoint_renamed_pth_is_read_by_its_content(tmp_path):
    ckpt = write_checkpoint(tmp_path / "encoder.pth", size=28, in_chans=1)
    assert resolve("--ckpt", ckpt, "--out", str(tmp_path / "a")).in_chans == 1


@pytest.mark.parametrize("held, asked, words", [
    (("resnet50", "imagenet", 3), ("resnet18", "imagenet", 3), "resnet50"),
    (("resnet18", "imagenet", 1), ("resnet18", "imagenet", 3), "1-channel input"),
])
def test_a_state_dict_of_another_architecture_is_one_line_naming_what_it_holds(tmp_path, held, asked, words):
    path = tmp_path / "weights.pth"
    torch.save(models.build_encoder(*held).state_dict(), path)
    with pytest.raises(UserError) as e:
        models.load_encoder(str(path), *asked)
    assert words in str(e.value) and "--arch" in str(e.value) and "\n" not in str(e.value)


def test_the_script_answers_a_wrong_state_dict_in_one_line_and_writes_nothing(tmp_path, real_root):
    path = tmp_path / "weights.pth"
    torch.save(models.build_encoder("resnet50").state_dict(), path)
    run = evaluate_cli("--init", str(path), "--data", "breastmnist", "--mode", "knn", "--out", str(tmp_path / "run"),
                       root=real_root)
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "resnet50" in run.stderr and not os.path.exists(tmp_path / "run")


def test_an_unfinished_pretraining_run_is_noted_and_its_epoch_recorded(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "checkpoint.pt", epoch=1, epochs=3)
    record = evaluate.pretraining_record(ckpt)
    assert (record["epoch"], record["epochs"], record["size"]) == (1, 3, 64)
    assert "unfinished pretraining run (epoch 1 of 3)" in capsys.readouterr().out


# ---------------------------------------------------------------- class weights, subsets, the SGD probe
def test_balanced_class_weights_are_scikit_learns_and_weight_the_loss():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    weights = supervised.class_weights(labels, metrics.MULTI_CLASS, 3)
    assert np.allclose(weights.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy()))
    logits = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    per_image = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    manual = (weights[labels] * per_image).sum() / weights[labels].sum()
    assert torch.allclose(supervised.classification_loss(logits, labels, metrics.MULTI_CLASS, weights), manual)
    # a one-logit binary head: the positive class's weight relative to the negative's
    binary = torch.tensor([0, 0, 0, 1])
    w = supervised.class_weights(binary, metrics.BINARY, 2)
    one = torch.randn(4, 1, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(one[:, 0], binary.float(), pos_weight=w[1] / w[0])
    assert torch.allclose(supervised.classification_loss(one, binary, metrics.BINARY, w), expected)


def test_every_seeds_labelled_subset_is_printed_and_saved_per_class(real_root, capsys):
    labels = np.load(os.path.join(real_root, "breastmnist.npz"))["train_labels"].reshape(-1)
    for seed in (0, 1):
        result, splits = seed_run(real_root, "--init", "random", "--data", "breastmnist", "--mode", "knn",
                                  "--label-fraction", "0.1", seed=seed)
        names = splits["train"].info.class_names
        expected = {name: max(1, round(0.1 * int((labels == i).sum()))) for i, name in enumerate(names)}
        assert result.info["train_images_per_class"] == expected
        assert result.info["train_images"] == sum(expected.values())
        assert result.val_score.shape == (len(splits["val"].labels), 2)  # where the threshold is chosen
    out = capsys.readouterr().out
    assert f"seed 1: {sum(expected.values())} labelled training images (malignant: {expected['malignant']}" in out


class Scaled(torch.nn.Module):
    """An encoder whose features are `factor` times larger: the same information at another scale."""

    def __init__(self, encoder, factor):
        super().__init__()
        self.encoder, self.factor = encoder, factor

    def forward(self, x):
        return self.encoder(x) * self.factor


def test_the_sgd_probe_measures_features_whatever_their_scale(real_root, monkeypatch):
    """Random-init features differ in scale from pretrained ones by orders of magnitude; paper 001's SGD
    head at one lr then measures the lr, not the features (at 1000x raw features its loss diverges).
    Standardised features make the probe's answer independent of the scale and as good as the
    logistic-regression probe's."""
    build = models.build_encoder
    aucs = {}
    for factor, probe in ((1, "logreg"), (1, "sgd"), (1000, "sgd")):
        monkeypatch.setattr(models, "build_encoder", lambda *a, f=factor: Scaled(build(*a), f))
        result, splits = seed_run(real_root, "--init", "random", "--data", "breastmnist", "--mode", "linear_probe",
                                  "--probe", probe)
        aucs[(factor, probe)] = metrics.auc(splits["test"].labels.numpy(), result.y_score, metrics.BINARY)
    assert abs(aucs[(1000, "sgd")] - aucs[(1, "sgd")]) < 0.01, aucs
    assert aucs[(1, "sgd")] > aucs[(1, "logreg")] - 0.05 and aucs[(1, "sgd")] > 0.7, aucs


# ---------------------------------------------------------------- the default fine-tune at few labels
def write_breast_folders(root, real_root):
    """BreastMNIST's 780 images as class folders named for their classes (the split is then drawn)."""
    npz = np.load(os.path.join(real_root, "breastmnist.npz"))
    i = 0
    for split in ("train", "val", "test"):
        for image, label in zip(npz[f"{split}_images"], npz[f"{split}_labels"][:, 0]):
            folder = root / ("malignant" if label == 0 else "benign")
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / f"{split}_{i:04d}.png")
            i += 1
    return str(root)


@pytest.mark.parametrize("source, fraction, min_test_auc", [
    ("breastmnist", "0.1", 0.7),     # 55 labelled images, 15 malignant
    ("folders", "0.1", 0.7),         # the same images as class folders, a drawn split
    ("pneumoniamnist", "0.01", 0.8),  # 47 labelled images
])
def test_the_default_fine_tune_does_not_collapse_at_small_label_fractions(real_root, tmp_path, source, fraction,
                                                                          min_test_auc):
    """With paper 001's settings (BatchNorm's running statistics left to lag one or two steps per
    epoch) the eval-mode network drifts to one class: BreastMNIST at 10% scored test AUC 0.67 on this
    seed, validation AUC stuck lower in other layouts. The default (precise BatchNorm) must learn, and
    the threshold chosen on validation must call both classes."""
    data_flag = write_breast_folders(tmp_path, real_root) if source == "folders" else source
    result, splits = seed_run(real_root, "--init", "random", "--data", data_flag, "--mode", "finetune",
                              "--label-fraction", fraction)
    test = metrics.evaluation_metrics(splits["test"].labels.numpy(), result.y_score, metrics.BINARY,
                                      y_val=splits["val"].labels.numpy(), val_score=result.val_score)
    assert result.info["val_auc"] > 0.7 and test["auc"] > min_test_auc, (result.info, test)
    assert min(test["sensitivity_at_threshold"], test["specificity_at_threshold"]) > 0.2, test


def test_a_feature_constant_on_few_training_images_keeps_its_scale_in_the_sgd_probe(real_root):
    """At 1% of BreastMNIST (5 images) dozens of random-init channels are constant on the training
    images and not on the others: divided by their ~0 training std, they would swamp the head."""
    aucs = {}
    for probe in ("logreg", "sgd"):
        result, splits = seed_run(real_root, "--init", "random", "--data", "breastmnist", "--mode", "linear_probe",
                                  "--probe", probe, "--label-fraction", "0.01")
        aucs[probe] = metrics.auc(splits["test"].labels.numpy(), result.y_score, metrics.BINARY)
    assert aucs["sgd"] > aucs["logreg"] - 0.1, aucs


def test_a_run_written_before_a_flag_existed_resumes_and_a_changed_default_names_the_flag(tmp_path):
    """args.yaml of an unfinished run that predates flags added since (read as their value then), and
    one fine-tuned with paper 001's --precise-bn off before the default became on."""
    import yaml
    from common import rundir
    from common import cli
    args = evaluate.resolve_args(cli.parse_args(evaluate.get_args_parser(),
                                                ["--init", "random", "--mode", "finetune", "--out", str(tmp_path / "run")]))
    flags = vars(args)
    os.makedirs(args.out)
    old = {k: v for k, v in flags.items() if k not in rundir.FLAGS_ADDED}
    (tmp_path / "run" / "args.yaml").write_text(yaml.safe_dump(old))
    assert rundir.prepare_run_dir(args.out, flags, done_file="metrics.json") is True
    os.makedirs(tmp_path / "off")
    (tmp_path / "off" / "args.yaml").write_text(yaml.safe_dump({**old, "precise_bn": "off", "out": str(tmp_path / "off")}))
    with pytest.raises(UserError, match="pass --precise-bn off to continue it"):
        rundir.prepare_run_dir(str(tmp_path / "off"), {**flags, "out": str(tmp_path / "off")}, done_file="metrics.json")
