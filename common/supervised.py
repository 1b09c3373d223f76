"""The supervised loop evaluate.py and finetune_beit.py share: the loss and class probabilities of a
classifier, training with the epoch chosen on the validation split, precise BatchNorm, and the
seeded repeats with their results files.

Selection: the epoch (or probe strength, or k) with the best validation AUC is kept. When the
validation split lacks a class (or a label has one value only) its AUC is undefined; the lowest
validation loss (cross-entropy of the probabilities) then chooses instead, and the run says so
(`selected_on: val_loss` in metrics.json, a note on stdout).

Interruptions: each seed's result is written to seed_<N>.json when the seed ends, and metrics.json
last of all, so a directory with metrics.json is finished and the same command run again on an
unfinished one resumes at the next seed (log.jsonl cut back to the finished seeds)."""
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import data, errors, loggers, metrics, models, optim, precision, results, rundir
from common.errors import UserError

# What a run of evaluate.py / finetune_beit.py writes in its directory; --overwrite clears these
# before the new run writes anything (output.log, the reproduce scripts' capture, stays).

# ---------------------------------------------------------------- loss and probabilities
def classification_loss(logits, labels, task, class_weight=None):
    """Cross-entropy of a classifier's logits: multi-label, one binary cross-entropy per label; a
    binary task with one logit (paper 000's BEiT head), binary cross-entropy; otherwise softmax
    cross-entropy (a binary task with two logits included). class_weight (from class_weights): per
    class weights of the softmax loss, or per label positive weights of the multi-label one."""
    logits = logits.float()
    if task == metrics.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=class_weight)
    if task == metrics.BINARY and logits.shape[1] == 1:
        pos_weight = None if class_weight is None else class_weight[1] / class_weight[0]
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), pos_weight=pos_weight)
    return F.cross_entropy(logits, labels, weight=class_weight)


def class_weights(labels, task, n_classes):
    """--class-weight balanced: scikit-learn's "balanced" weights n / (n_classes * n_c) of the training
    labels (a float32 tensor on their device), so each class adds the same total to the loss; for a
    multi-label task, each label's negatives / positives as its positive weight. A class absent from
    the subset gets weight 1 (it has no term in the loss anyway)."""
    y = labels.float() if task == metrics.MULTI_LABEL else labels
    if task == metrics.MULTI_LABEL:
        positives = y.sum(dim=0)
        return ((len(y) - positives) / positives.clamp(min=1)).clamp(min=1e-3)
    counts = torch.bincount(y.reshape(-1), minlength=n_classes).float()
    return torch.where(counts > 0, len(y) / (n_classes * counts.clamp(min=1)), torch.ones_like(counts))


def subset_record(seed, split, index):
    """Every subset said: the rows `index` of the training `split` (data.Split) that one seed trains on,
    printed as one line of labelled images per class (multi-label: positives per label) and returned
    as its metrics.json keys train_images and train_images_per_class."""
    names = split.info.class_names if split.info else [str(c) for c in range(split.n_classes)]
    y = split.labels[index].cpu().numpy()
    if split.task == metrics.MULTI_LABEL:
        counts = {str(name): int(n) for name, n in zip(names, y.sum(axis=0))}
    else:
        counts = {str(name): int(n) for name, n in zip(names, np.bincount(y.reshape(-1), minlength=len(names)))}
    tqdm.write(f"seed {seed}: {len(y)} labelled training images ("
               + ", ".join(f"{errors.escape(name)}: {n}" for name, n in counts.items()) + ")", file=sys.stdout)
    return {"train_images": len(y), "train_images_per_class": counts}


def _activate(logits, task):
    """Logits -> class probabilities; a one-logit binary head as two columns (1 - p, p)."""
    if task == metrics.MULTI_LABEL:
        return torch.sigmoid(logits)
    if task == metrics.BINARY and logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return logits.softmax(dim=1)


def model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def probabilities(model, inputs, task, forward=None, batch_size=512):
    """Class probabilities (numpy, N x C) of a whole split in eval mode; forward(batch) -> logits
    (default model(batch)), e.g. with the model's own preprocessing or augmentation. `inputs` may be
    in pinned host memory (data.batch brings each batch to the model's device)."""
    forward = forward or model
    model.eval()
    device = model_device(model)
    logits = torch.cat([forward(data.batch(inputs, slice(i, i + batch_size), device)).float()
                        for i in range(0, len(inputs), batch_size)])
    return _activate(logits, task).cpu().numpy()


def probability_loss(y_true, y_score, task):
    """Mean cross-entropy of class probabilities against labels (the fallback selection score)."""
    p = np.clip(np.asarray(y_score, dtype=float), 1e-7, 1 - 1e-7)
    y = np.asarray(y_true)
    if task == metrics.MULTI_LABEL:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    y = y.reshape(-1).astype(int)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def auc_defined(y_true, task, n_columns):
    """True when the AUC of `y_true` is defined: every class present (every label with both values)."""
    y = np.asarray(y_true)
    if task == metrics.MULTI_LABEL:
        positives = y.sum(axis=0)
        return bool(np.all((positives > 0) & (positives < len(y))))
    return bool(np.isin(np.arange(max(n_columns, 2)), y.reshape(-1)).all())


def selection_score(y_true, y_score, task):
    """(score, val_auc): the validation AUC, or minus the validation loss when the AUC is undefined
    (val_auc None then). Higher is better either way."""
    if auc_defined(y_true, task, np.asarray(y_score).shape[1]):
        value = metrics.auc(y_true, y_score, task)
        return value, value
    return -probability_loss(y_true, y_score, task), None


# ---------------------------------------------------------------- training modes and precise BN
def enter_training(model, frozen_bn="eval"):
    """model.train(), with the BatchNorm of frozen parts in eval mode unless frozen_bn is "train"."""
    model.train()
    if frozen_bn == "eval":
        models.frozen_bn_eval(model)


@torch.no_grad()
def recompute_bn_stats(model, images, forward, batch_size, frozen_bn="eval", index=None):
    """Precise BN: replace the running statistics of every BatchNorm that trains with their average
    over `images` (its rows `index`, None: all) under the current weights (momentum None: the plain
    mean over the batches); forward(batch) runs the model. A lone last image joins the batch before
    it: training-mode BN cannot normalise one image at layer4's 1x1 maps."""
    enter_training(model, frozen_bn)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:  # nothing to recompute (a ViT: LayerNorm only): no pass over the images
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    n, device = len(images) if index is None else len(index), model_device(model)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for start, end in zip(starts, starts[1:] + [n]):
        forward(data.batch(images, slice(start, end) if index is None else index[start:end], device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


# ---------------------------------------------------------------- training with selection
@dataclass(frozen=True)
class Examples:
    """Labelled inputs: images or features, on the device or in pinned host memory (labels on the
    device). `index`: the rows that train (None: all), so a subset of a large split is drawn batch by
    batch instead of copied."""
    inputs: torch.Tensor
    labels: torch.Tensor
    index: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.inputs) if self.index is None else len(self.index)


@dataclass(frozen=True)
class Schedule:
    """How train_select trains. lr: the peak lr of lr_schedule, set every step (None: the optimiser's
    lr throughout); full_batches: drop the last partial batch (BatchNorm needs more than one image);
    precise_bn: recompute_bn_stats before each validation; frozen_bn: see enter_training; val_every:
    validate after every val_every-th epoch and the last."""
    epochs: int
    batch_size: int
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    lr_schedule: str = "constant"
    full_batches: bool = True
    precise_bn: bool = False
    frozen_bn: str = "eval"
    eval_batch_size: int = 512
    val_every: int = 1

    def steps(self, n):
        steps = max(1, n // self.batch_size) if self.full_batches else math.ceil(n / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass(frozen=True)
class Selection:
    """The chosen epoch: its validation AUC (None when undefined) and what chose it."""
    val_auc: Optional[float]
    best_epoch: int
    selected_on: str  # "val_auc", or "val_loss" when the validation AUC is undefined

    def info(self):
        """The per-seed keys of metrics.json ("selected_on" only when it is not the AUC)."""
        out = {"val_auc": self.val_auc, "best_epoch": self.best_epoch}
        return out if self.selected_on == "val_auc" else {**out, "selected_on": self.selected_on}


def check_finite_loss(losses, seed, epoch, lr):
    """The epoch's per-step losses (device tensors, read here once): their mean, or a UserError
    naming the seed, epoch and step where the loss stopped being finite."""
    losses = torch.stack(losses).double()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise UserError(f"the training loss became {losses[bad[0]].item()} at seed {seed}, epoch {epoch}, step "
                        f"{int(bad[0])} of the epoch; lower --lr" + (f" (now {lr:g})" if lr is not None else ""))
    return losses.mean().item()


def train_select(model, optimizer, train, val, task, seed, schedule, forward, *, forward_train=None, log=None,
                 class_weight=None):
    """Train `model` for schedule.epochs on `train` (Examples), validating after every epoch (every
    schedule.val_every-th and the last), and load the weights of the best validated one
    (selection_score) back. forward(batch) -> logits on unaugmented inputs (validation, precise BN);
    forward_train for the training batches (default forward).
    Batches are drawn from a generator seeded with `seed`; losses stay on the device until the epoch
    ends (one host sync per epoch). log(record) gets one record per epoch; class_weight: see
    classification_loss. Returns a Selection."""
    forward_train = forward_train or forward
    device = model_device(model)
    gen = torch.Generator(device).manual_seed(seed)
    y_val = val.labels.cpu().numpy()
    n, steps = len(train), schedule.steps(len(train))
    lr_set = schedule.lr
    best = {"score": -math.inf, "val_auc": None, "epoch": -1, "state": None}
    for epoch in range(schedule.epochs):
        errors.progress.update(epoch=epoch)
        enter_training(model, schedule.frozen_bn)
        perm = torch.randperm(n, generator=gen, device=device)
        if train.index is not None:
            perm = train.index[perm]
        losses, start = [], time.time()
        for i in range(steps):
            if lr_set is not None:
                optim.schedule_step(optimizer, schedule.lr_schedule, epoch * steps + i, schedule.epochs * steps, lr_set)
            idx = perm[i * schedule.batch_size:(i + 1) * schedule.batch_size]
            loss = classification_loss(forward_train(data.batch(train.inputs, idx, device)), train.labels[idx], task,
                                       class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        lr = optimizer.param_groups[0]["lr"]
        mean_loss = check_finite_loss(losses, seed, epoch, lr)
        seen = min(steps * schedule.batch_size, n)
        validation = {}  # the epoch's validation AUC (or loss, the AUC undefined), on validated epochs only
        if (epoch + 1) % schedule.val_every == 0 or epoch == schedule.epochs - 1:
            if schedule.precise_bn:
                recompute_bn_stats(model, train.inputs, forward, schedule.batch_size, schedule.frozen_bn, train.index)
            y_score = probabilities(model, val.inputs, task, forward, schedule.eval_batch_size)
            if not np.isfinite(y_score).all():
                raise UserError(f"the validation outputs became non-finite at seed {seed}, epoch {epoch}; lower "
                                f"--lr (now {lr:g})")
            score, val_auc = selection_score(y_val, y_score, task)
            if score > best["score"]:  # what can change: the trainable weights and every buffer (BN statistics)
                state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
                state.update({k: v.detach().clone() for k, v in model.named_buffers()})
                best = {"score": score, "val_auc": val_auc, "epoch": epoch, "state": state}
            validation = {"val_auc": None if val_auc is None else round(val_auc, 5),
                          **({} if val_auc is not None else {"val_loss": round(-score, 5)})}
        if log:
            log({"seed": seed, "epoch": epoch, "epochs": schedule.epochs, "loss": mean_loss, "lr": lr, **validation,
                 "best_epoch": best["epoch"], "images_per_sec": round(seen / (time.time() - start), 1)})
    model.load_state_dict(best["state"], strict=False)
    return Selection(best["val_auc"], best["epoch"], "val_auc" if best["val_auc"] is not None else "val_loss")


# ---------------------------------------------------------------- seeded repeats and their files
@dataclass(frozen=True)
class SeedRun:
    """What one seed gives: the test split's class probabilities, its per-seed metrics.json keys, and
    the validation split's class probabilities from the same model (where the decision threshold and
    the temperature are chosen)."""
    y_score: np.ndarray
    info: dict
    val_score: Optional[np.ndarray] = None


def seed_path(out, seed):
    return os.path.join(out, f"seed_{seed}.json")


def _finished_seeds(out, seeds):
    """The seeds whose seed_<N>.json exists (written atomically: a file there is complete)."""
    return [s for s in seeds if os.path.isfile(seed_path(out, s))]


def _load_seed(out, seed):
    with open(seed_path(out, seed)) as f:
        record = json.load(f)
    y_score = np.asarray(record.pop("y_score"), dtype=record.pop("y_score_dtype"))
    return record, y_score


# The key of a seed's record (seed_<N>.json, metrics.json's per_seed) holding the Precision it was computed in
# (Precision.record()); not "precision", the test metric that scripts/report.py's runs.csv puts beside it.
PRECISION_KEY = "arithmetic"


def seeds_precision(out, seeds, requested, device, side, convolutional=True):
    """The Precision (common/precision.py) of the seeded run in `out`: precision.resolve(requested, device,
    side), or, once some of its `seeds` are finished, the one their seed_<N>.json records, even where this
    resolve gives another (a resume on another device, or on a CPU without native bf16): one metrics.json
    pools seeds computed alike. A seed written before --precision existed ran bf16 on a GPU that has it and
    float32 elsewhere, channels_last. A ViT (convolutional=False: the BEiT, a timm ViT) stays contiguous, as
    the layout only speeds up convolutions. Printed once."""
    fresh = precision.resolve(requested, device, side, convolutional=convolutional)
    done, chosen = _finished_seeds(out, seeds), fresh
    if done:
        record, _ = _load_seed(out, done[0])
        cuda = torch.device(device).type == "cuda"
        recorded = record.get(PRECISION_KEY) or {"precision": "bf16" if cuda and precision.native_bf16(device)
                                                 else "fp32", "channels_last": convolutional}
        chosen = precision.resolve(requested, device, side, recorded=recorded)
    why = f"--precision {requested}"
    if chosen != fresh:
        why = (f"as seed{'s' if len(done) > 1 else ''} {', '.join(map(str, done))} of this run; {why} gives "
               f"{fresh.describe()} here")
    print(f"precision: {chosen.describe()} ({why})", flush=True)
    return chosen


def epoch_line(record):
    """One printed line per epoch: loss, validation AUC (or loss) and the best epoch so far."""
    phase = f" {record['phase']}" if record.get("phase") else ""
    if record.get("val_auc") is not None:
        val = f"val AUC {record['val_auc']:.4f}"
    elif "val_loss" in record:
        val = f"val loss {record['val_loss']:.4f} (AUC undefined)"
    else:
        val = "not validated (--val-every)"
    best = record["best_epoch"] + 1 if record["best_epoch"] >= 0 else "none yet"
    return (f"seed {record['seed']}{phase} epoch {record['epoch'] + 1}/{record['epochs']}: loss {record['loss']:.4f}, "
            f"{val}, best epoch {best}")


# the per-epoch records that the trackers (--logger) get
SCALARS = ("loss", "val_auc", "val_loss", "lr")


def write_scalars(trackers, record):
    """One per-epoch record as scalars at step `epoch`, tagged seed<N>/<key> (a phase before the
    main one, e.g. the head-only epochs: seed<N>/<phase>/<key>)."""
    prefix = f"seed{record['seed']}/" + (f"{record['phase']}/" if record.get("phase") else "")
    loggers.log(trackers, {prefix + key: record[key] for key in SCALARS if record.get(key) is not None},
                record["epoch"], axis="epoch")


def run_seeds(out, seeds, run_seed, y_true, task, header, title, *, epochs_per_seed=0, class_names=None,
              positive_class=1, y_val=None, temperature_scaling=False, precision=None):
    """The seeded repeats: run_seed(seed, log) -> SeedRun for every seed not finished in `out`, each
    seed's test metrics (metrics.evaluation_metrics with `positive_class`, binary tasks; the decision
    threshold chosen on the validation labels `y_val` and the seed's val_score; with
    `temperature_scaling`, both splits' probabilities first divided by the temperature fitted on
    validation) and scores saved
    to seed_<N>.json as it ends, then metrics.json, predictions.npz and the plots from the saved files
    (results.write_results with `class_names`; metrics.json last). log(record) appends to log.jsonl,
    prints epoch_line, advances a progress bar over seeds and epochs (epochs_per_seed of them; 0 for
    probes without epochs) and gives the record's SCALARS to the trackers of header["args"]["logger"]
    (common/loggers.py; cli.parse_args folds --tensorboard into it).
    `precision` (seeds_precision), when given, is recorded in every seed's file (PRECISION_KEY) and in
    metrics.json ("precision"). Returns the metrics.json dict."""
    log_path = os.path.join(out, "log.jsonl")
    done = _finished_seeds(out, seeds)
    # rundir.check_inputs refuses a resume on other data or another encoder; a run that records no inputs
    # (an earlier MedSSL's) is checked here at least for a test split of another size, before anything changes
    for seed in done:
        n_scored = len(_load_seed(out, seed)[1])
        if n_scored != len(y_true):
            raise UserError(f"seed {seed} in {out} was scored on {n_scored} test images and this run's test split "
                            f"has {len(y_true)}: the data changed since, and one metrics.json must not pool them; "
                            f"restore the data it was started on, or start again with "
                            f"{'--overwrite or another --out' if rundir.can_overwrite(out) else 'another --out'}")
    for path in glob.glob(os.path.join(glob.escape(out), ".tmp-*")):  # left by a kill during an atomic write
        os.remove(path)
    rundir.cut_log(log_path, lambda record: record.get("seed") in done)  # unfinished seeds log again
    if done:
        tqdm.write(f"resuming {out}: seed{'s' if len(done) > 1 else ''} {', '.join(map(str, done))} finished",
                   file=sys.stdout)
    per = max(1, epochs_per_seed)
    # disable=None: the bar is drawn on a terminal only, so logs and captured stderr stay clean
    bar = tqdm(total=len(seeds) * per, initial=len(done) * per, unit="epoch", desc="seeds x epochs", disable=None,
               dynamic_ncols=True)
    # --logger (with --tensorboard folded in) from the script's flags, which are the trackers' config
    config = header.get("args") or {}
    trackers = loggers.open_trackers(loggers.chosen(config.get("logger"), config.get("tensorboard")), out, config)

    def log(record):
        rundir.append_jsonl(log_path, record)
        if "epoch" in record:
            tqdm.write(epoch_line(record), file=sys.stdout)
            bar.update(1)
            write_scalars(trackers, record)

    try:
        for i, seed in enumerate(seeds):
            if seed in done:
                continue
            errors.progress.update(seed=seed, epoch=None)
            result = run_seed(seed, log)
            y_score, val_score, info = np.asarray(result.y_score), result.val_score, dict(result.info)
            if temperature_scaling and val_score is not None:
                info["temperature"] = metrics.fit_temperature(y_val, val_score, task)
                y_score = metrics.apply_temperature(y_score, info["temperature"], task).astype(y_score.dtype)
                val_score = metrics.apply_temperature(val_score, info["temperature"], task)
            test = metrics.evaluation_metrics(y_true, y_score, task, positive_class=positive_class,
                                              y_val=None if val_score is None else y_val, val_score=val_score)
            if info.get("selected_on") == "val_loss":
                tqdm.write(f"note: seed {seed}: the validation split lacks a class, so its AUC is undefined; "
                           f"the lowest validation loss chose", file=sys.stdout)
            record = {"seed": seed, "test": test, **info, "y_score": y_score.tolist(),
                      "y_score_dtype": str(y_score.dtype)}
            if precision is not None:
                record[PRECISION_KEY] = precision.record()
            rundir.atomic_write_text(seed_path(out, seed), json.dumps(record))
            errors.progress.update(checkpoint=seed_path(out, seed))  # an interrupt now keeps this seed
            bar.n = (i + 1) * per
            bar.refresh()
            tqdm.write(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()), file=sys.stdout)
    finally:
        bar.close()
        loggers.close(trackers)
    loaded = [_load_seed(out, seed) for seed in seeds]
    header = header if precision is None else {**header, "precision": precision.record()}
    return results.write_results(out, header, [r for r, _ in loaded], y_true, [s for _, s in loaded], task,
                                 seeds[0], title=title, class_names=class_names, positive_class=positive_class)


def positive_class(value, info):
    """--positive-class as a class index of the dataset `info` (data.DatasetInfo): a binary task's
    index or class name (metrics.positive_index); other tasks have none (1, the default, is ignored)."""
    if info.task != metrics.BINARY:
        if str(value).strip() != "1":
            raise UserError(f"--positive-class applies to binary tasks; {info.source} is {info.task!r}: drop it")
        return 1
    try:
        return metrics.positive_index(value, info.class_names)
    except ValueError as e:
        raise UserError(f"--positive-class: {e}")


def default_batch_size(n_train):
    """128, or the whole training subset if smaller (at least 2: BatchNorm trains)."""
    return max(2, min(128, n_train))


def check_batch_size(batch_size, n_train):
    if batch_size > n_train:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_train} training images; "
                        f"use --batch-size {n_train} or less")
