"""Evaluate an encoder on a labelled MedMNIST dataset: linear probe, fine-tune, few-shot or kNN.

The encoder comes from a pretraining checkpoint (--ckpt) or a baseline init (--init random|imagenet|
<.pth>). Training uses the train split (or a seeded subset of it), the epoch (or probe strength, or
k) is chosen by validation AUC, and the test split is scored once.

    python evaluate.py --ckpt runs/x/checkpoint.pt --data pneumoniamnist --mode linear_probe --seeds 3
    python evaluate.py --init random --data breastmnist --mode finetune --seeds 3
    python evaluate.py --ckpt runs/x/checkpoint.pt --data breastmnist --mode finetune --freeze layer3
    python evaluate.py --config configs/paper003_further_finetune.yaml --ckpt runs/x/checkpoint.pt --data dermamnist
    python evaluate.py compare runs/a/metrics.json runs/b/metrics.json
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from common import augment, cli, data, metrics, models, optim, rundir, saliency
from common.cli import UserError

# Per-mode defaults of paper 001 (§5.2-5.4): fine-tune 25 epochs at 1e-3, few-shot 25-50 epochs
# at 1e-2 on 20 samples, linear probe 50 epochs at 1e-2.
# precise_bn is ours, not paper 001's: see --precise-bn.
MODE_DEFAULTS = {"finetune": {"epochs": 25, "lr": 1e-3, "precise_bn": "off"},
                 "fewshot": {"epochs": 50, "lr": 1e-2, "precise_bn": "on"},
                 "linear_probe": {"epochs": 50, "lr": 1e-2}, "knn": {"epochs": 1, "lr": 1.0}}
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried by the fast linear probe
KNN_K = (5, 10, 20, 50)


def get_args_parser():
    parser = argparse.ArgumentParser("evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, data_help="labelled MedMNIST 2D flag to evaluate on")

    # * What to evaluate
    g = parser.add_argument_group("encoder and protocol")
    g.add_argument("--ckpt", default=None, help="checkpoint.pt of pretrain_byol.py / pretrain_barlow.py")
    g.add_argument("--init", default=None, help="baseline encoder without --ckpt: random | imagenet | <.pth> "
                   "(default random; paper 001's base model: imagenet)")
    g.add_argument("--mode", default="linear_probe", choices=sorted(MODE_DEFAULTS),
                   help="linear_probe: frozen encoder + linear head; finetune: all layers; fewshot: all "
                        "layers on --shots images per class; knn: k nearest neighbours of frozen features")
    g.add_argument("--probe", default="logreg", choices=["logreg", "sgd"],
                   help="linear probe: logreg = logistic regression on features computed once, L2 strength "
                        "chosen on validation (fast); sgd = paper 001's 50-epoch SGD head")
    g.add_argument("--shots", type=int, default=20, help="fewshot: training images per class (paper 001: 20)")
    g.add_argument("--label-fraction", type=float, default=1.0,
                   help="stratified fraction of the train split's labels used, in (0, 1]")
    g.add_argument("--resize", type=int, default=None,
                   help="upsample the --size images to this side on the device (nearest), e.g. 224 for MedMNIST "
                        "v2's ResNet (224) rows, which were 28 px images upsampled")
    g.add_argument("--seeds", type=int, default=1, help="seeded repeats (seed, seed+1, ...), reported as mean ± std")

    # * Optimisation (defaults per mode: MODE_DEFAULTS above)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default: finetune 25, fewshot 50, sgd probe 50 (paper 001)")
    g.add_argument("--lr", type=cli.lr_or_auto, default=None,
                   help="Adam lr for finetune (1e-3) / fewshot (1e-2), SGD lr for the sgd probe (1e-2) (paper 001 §5.4); "
                        "auto (finetune, fewshot): an LR range test per seed picks the peak lr (paper 003 §3.4)")
    g.add_argument("--batch-size", type=int, default=None, help="default 128, or the whole split if smaller")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay (paper 001 used one but does not give its value)")

    # * Fine-tuning recipes of papers 002 and 003 (finetune and fewshot modes)
    g = parser.add_argument_group("fine-tuning recipes (papers 002, 003; finetune and fewshot modes)")
    g.add_argument("--freeze", default="none", choices=["none", *models.STAGES],
                   help="freeze the encoder up to and including this stage (paper 002's study): layer3 trains "
                        "layer4 + the head, layer4 the head alone, stem layer1-4 + the head")
    g.add_argument("--frozen-bn", default="eval", choices=["eval", "train"],
                   help="BatchNorm in frozen stages: eval = running statistics, left untouched (default); "
                        "train = batch statistics, running statistics updated (weights frozen either way)")
    g.add_argument("--head-epochs", type=int, default=0,
                   help="first train the head alone for N epochs on the frozen encoder, Adam at --head-lr "
                        "(paper 003 §3.4: 1), then the main phase")
    g.add_argument("--head-lr", type=float, default=2e-3,
                   help="Adam lr of the head-only epochs (fastai's fine_tune default 2e-3; paper 003's value is "
                        "a fixed Adam lr)")
    g.add_argument("--lr-schedule", default="constant", choices=list(optim.LR_SCHEDULES),
                   help="lr schedule of the main phase: constant (paper 001), cosine (paper 002), 1cycle (paper 003), "
                        "step (x0.1 at 50%% and 75%% of the epochs: MedMNIST v2's protocol)")
    g.add_argument("--lr-range", type=float, nargs=3, default=[1e-7, 10.0, 100], metavar=("START", "END", "STEPS"),
                   help="sweep of --lr auto (fastai's lr_find: 1e-7 10 100)")
    g.add_argument("--train-aug", default="none", choices=sorted(augment.FINETUNE_AUG),
                   help="augmentation of the training batches: none (paper 001), paper003 (random crop, rotation, "
                        "flip, App. A.1)")
    g.add_argument("--tta", type=int, default=0,
                   help="test-time augmentation: average the class probabilities of K passes augmented with "
                        "--train-aug (paper 003: 3; 0 = off)")
    g.add_argument("--precise-bn", default=None, choices=["on", "off"],
                   help="before each validation, recompute BatchNorm's running statistics over the training images "
                        "(default: on for fewshot, off for finetune). With one step per epoch at lr 1e-2 the "
                        "running averages lag the weights and the eval-mode network outputs one class (measured: "
                        "test AUC 0.50 without, 0.78-0.80 with, PneumoniaMNIST 20 shots)")
    g.add_argument("--saliency", type=int, default=0, metavar="N",
                   help="finetune / fewshot: write saliency.npz, Grad-CAM and occlusion maps of the first seed's "
                        "model on the first N test images for their true class (paper 002's figure; 0 = off)")
    return parser


def resolve_args(args):
    if args.ckpt and args.init:
        raise UserError("give --ckpt or --init, not both")
    if "," in args.data:
        raise UserError("evaluate.py takes one --data flag")
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.seeds <= 0:
        raise UserError(f"--seeds must be positive, got {args.seeds}")
    full_model = args.mode in ("finetune", "fewshot")
    for flag, used in (("--freeze", args.freeze != "none"), ("--lr auto", args.lr == "auto"),
                       ("--head-epochs", args.head_epochs), ("--tta", args.tta), ("--train-aug", args.train_aug != "none"),
                       ("--saliency", args.saliency), ("--precise-bn", args.precise_bn == "on")):
        if used and not full_model:
            raise UserError(f"{flag} applies to --mode finetune / fewshot, not {args.mode}")
    if args.resize is not None and args.resize <= 0:
        raise UserError(f"--resize must be a positive image side, got {args.resize}")
    if args.head_epochs < 0 or args.tta < 0:
        raise UserError("--head-epochs and --tta must be 0 or more")
    if args.tta and args.train_aug == "none":
        raise UserError("--tta averages augmented passes: name the augmentation with --train-aug paper003")
    args.out = args.out or cli.default_out(f"evaluate-{args.mode}", args.data)
    if args.ckpt:
        meta = rundir.load_checkpoint(args.ckpt).get("meta", {}) if args.ckpt.endswith(".pt") else {}
        models.check_meta(meta, args.ckpt, args.arch, args.stem, args.in_chans)
        args.arch, args.stem, args.in_chans = meta["arch"], meta["stem"], meta["in_chans"]
    args.init = args.ckpt or args.init or "random"
    args.arch, args.stem = args.arch or "resnet18", args.stem or "imagenet"
    args.in_chans = args.in_chans or 3
    return args


# ---------------------------------------------------------------- heads trained with epoch selection
def loss_fn(logits, labels, task):
    if task == metrics.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def predict(model, inputs, prepare, task, batch_size=512):
    model.eval()
    logits = torch.cat([model(prepare(inputs[i:i + batch_size])).float() for i in range(0, len(inputs), batch_size)])
    probs = torch.sigmoid(logits) if task == metrics.MULTI_LABEL else logits.softmax(dim=1)
    return probs.cpu().numpy()


def train_mode(args, model):
    """model.train(), with BatchNorm of frozen stages in eval mode unless --frozen-bn train."""
    model.train()
    if getattr(args, "frozen_bn", "eval") == "eval":
        models.frozen_bn_eval(model)


@torch.no_grad()
def recompute_bn_stats(args, model, images, prepare, batch_size):
    """Precise BN: replace the running statistics of every BatchNorm that trains with their average
    over `images` under the current weights (momentum None: the plain mean over the batches). A lone
    last image joins the batch before it: training-mode BN cannot normalise one image at layer4's
    1x1 maps."""
    train_mode(args, model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    starts = list(range(0, len(images), batch_size))
    if len(starts) > 1 and len(images) - starts[-1] == 1:
        starts.pop()
    for start, end in zip(starts, starts[1:] + [len(images)]):
        model(prepare(images[start:end]))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def train_select(args, model, optimizer, train, val, prepare, task, seed, log, prepare_train=None, lr=None):
    """Train for args.epochs; keep the weights of the epoch with the best validation AUC.
    prepare_train: the training batches' preparation (default `prepare`), e.g. with augmentation;
    lr: the peak lr of args.lr_schedule, applied per step (None: the optimizer's lr throughout)."""
    (x_train, y_train), (x_val, y_val) = train, val
    gen = torch.Generator(x_train.device).manual_seed(seed)
    y_val_np = y_val.cpu().numpy()
    steps = max(1, len(x_train) // args.batch_size)  # full batches only: BN needs more than one image
    if args.max_steps:
        steps = min(steps, args.max_steps)
    prepare_train = prepare_train or prepare
    best_auc, best_state, best_epoch = -1.0, None, -1
    for epoch in range(args.epochs):
        train_mode(args, model)
        perm = torch.randperm(len(x_train), generator=gen, device=x_train.device)
        total = 0.0
        for i in range(steps):
            if lr is not None:
                optim.schedule_step(optimizer, args.lr_schedule, epoch * steps + i, args.epochs * steps, lr)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = loss_fn(model(prepare_train(x_train[idx])), y_train[idx], task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        if getattr(args, "precise_bn", "off") == "on":
            recompute_bn_stats(args, model, x_train, prepare, args.batch_size)
        val_auc = metrics.auc(y_val_np, predict(model, x_val, prepare, task), task)
        log({"seed": seed, "epoch": epoch, "loss": total / steps, "val_auc": round(val_auc, 5)})
        if val_auc > best_auc:
            best_auc, best_epoch = val_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"val_auc": best_auc, "best_epoch": best_epoch}


def logreg_probe(train, val, test, task):
    """Logistic regression on standardised frozen features, L2 strength chosen by validation AUC."""
    (f_train, y_train), (f_val, y_val), f_test = train, val, test
    scaler = StandardScaler().fit(f_train)
    f_train, f_val, f_test = scaler.transform(f_train), scaler.transform(f_val), scaler.transform(f_test)
    best = (-1.0, None, None)
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf = OneVsRestClassifier(clf) if task == metrics.MULTI_LABEL else clf
        clf.fit(f_train, y_train)
        val_auc = metrics.auc(y_val, clf.predict_proba(f_val), task)
        if val_auc > best[0]:
            best = (val_auc, c, clf)
    return best[2].predict_proba(f_test), {"val_auc": best[0], "C": best[1]}


def knn_probe(train, val, test, task, n_classes):
    (f_train, y_train), (f_val, y_val), f_test = train, val, test
    aucs = {k: metrics.auc(y_val.cpu().numpy(), metrics.knn_scores(f_train, y_train, f_val, k, task, n_classes), task)
            for k in KNN_K}
    k = max(aucs, key=aucs.get)
    return metrics.knn_scores(f_train, y_train, f_test, k, task, n_classes), {"val_auc": aucs[k], "k": k}


# ---------------------------------------------------------------- fine-tuning (finetune, fewshot)
def finetune(args, encoder, train, val, test, task, n_out, seed, device, log):
    """Encoder + linear head trained on `train`, the epoch chosen by validation AUC, the test split
    scored. Paper 002's --freeze keeps the stem .. that stage fixed; paper 003's recipe (§3.4) is
    --head-epochs 1 (head alone), then --lr auto (range test) with --lr-schedule 1cycle, with
    --train-aug paper003 and --tta 3. Returns (test scores, info, model)."""
    x_train, y_train = train
    model = torch.nn.Sequential(encoder, torch.nn.Linear(models.FEATURE_DIM[args.arch], n_out)).to(device)
    aug_gen = torch.Generator(device).manual_seed(seed)
    steps_aug = augment.FINETUNE_AUG[args.train_aug]

    def prepare(x):
        return data.to_input(x, args.in_chans, args.resize).contiguous(memory_format=torch.channels_last)

    def prepare_aug(x):  # uint8 -> [0, 1] floats, augmented per image, then normalised
        return prepare(augment.apply_steps(x.float().div_(255), steps_aug, aug_gen))
    prepare_train = prepare_aug if steps_aug else prepare
    info = {}

    # ---- paper 003 §3.4: the head alone first, encoder frozen (its BN too, with --frozen-bn eval)
    if args.head_epochs:
        models.freeze_through(encoder, "layer4")
        head_opt = torch.optim.Adam(model[1].parameters(), lr=args.head_lr, weight_decay=args.weight_decay)
        head_args = argparse.Namespace(**{**vars(args), "epochs": args.head_epochs})
        head = train_select(head_args, model, head_opt, (x_train, y_train), (val.images, val.labels), prepare,
                            task, seed, lambda r: log({"phase": "head", **r}), prepare_train)
        info["head_val_auc"] = head["val_auc"]

    # ---- main phase: the encoder from --freeze on, and the head
    info["trainable_params"] = models.freeze_through(encoder, args.freeze) + \
        sum(p.numel() for p in model[1].parameters())
    lr = args.lr
    if lr == "auto":
        lr = find_lr(args, model, x_train, y_train, prepare_train, task, seed)
        info["lr_found"] = lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    info.update(train_select(args, model, optimizer, (x_train, y_train), (val.images, val.labels), prepare,
                             task, seed, log, prepare_train, lr=None if args.lr_schedule == "constant" else lr))
    if args.tta:
        y_score = np.mean([predict(model, test.images, prepare_aug, task) for _ in range(args.tta)], axis=0)
    else:
        y_score = predict(model, test.images, prepare, task)
    return y_score, info, model


def find_lr(args, model, x_train, y_train, prepare_train, task, seed):
    """--lr auto: an LR range test of the parameters about to be trained (model state restored
    afterwards), on batches drawn with their own generator; curve and pick saved per seed."""
    train_mode(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr_range[0], weight_decay=args.weight_decay)
    gen = torch.Generator(x_train.device).manual_seed(seed + 1)
    batch = min(args.batch_size, len(x_train))

    def batch_loss():
        idx = torch.randint(len(x_train), (batch,), generator=gen, device=x_train.device)
        return loss_fn(model(prepare_train(x_train[idx])), y_train[idx], task)
    start, end, steps = args.lr_range
    lrs, losses, lr = optim.lr_range_test(batch_loss, optimizer, [model], start, end, int(steps))
    name = os.path.join(args.out, f"lr_range_seed{seed}")
    rundir.atomic_write_text(name + ".json", json.dumps({"lrs": lrs, "losses": losses, "chosen": lr}))
    metrics.plot_lr_range(lrs, losses, lr, name + ".png", title=f"LR range test, seed {seed}")
    return lr


def write_saliency(args, model, test):
    """--saliency N: where the fine-tuned model looks on the first N test images (the same images in
    every run, so scripts/report.py can put two models' maps side by side), for each image's true
    class (its first positive label when multi-label). Maps are stored at the stored image size."""
    images, labels = test.images[:args.saliency], test.labels[:args.saliency]
    target = labels.argmax(dim=1) if labels.ndim == 2 else labels
    x = data.to_input(images, args.in_chans, args.resize)
    side, layer = x.shape[-1], saliency.deepest_spatial_stage(model[0], x)
    maps = {"gradcam": saliency.gradcam(model, getattr(model[0], layer), x, target),
            "occlusion": saliency.occlusion_sensitivity(model, x, target, patch=max(2, side // 7),
                                                        stride=max(1, side // 14))}
    maps = {k: torch.nn.functional.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
            for k, m in maps.items()}
    np.savez(os.path.join(args.out, "saliency.npz"), images=images.cpu().numpy(), index=np.arange(len(images)),
             class_idx=target.cpu().numpy(), layer=layer, **{k: m.cpu().numpy() for k, m in maps.items()})


# ---------------------------------------------------------------- one seeded run
def run_seed(args, seed, splits, template, device, log):
    cli.seed_everything(seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if args.mode == "fewshot":
        idx = data.few_shot_indices(train.labels, args.shots, seed)
    else:
        idx = data.label_fraction_indices(train.labels, args.label_fraction, seed)
    idx = torch.as_tensor(idx, device=device)
    x_train, y_train = train.images[idx], train.labels[idx]
    if args.batch_size > len(idx):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(idx)} training images; "
                        f"use --batch-size {len(idx)} or less")
    # a random init must differ per seed; a loaded one is the same weights every time
    encoder = models.build_encoder(args.arch, args.stem, args.in_chans) if args.init == "random" \
        else copy.deepcopy(template)
    encoder.to(device, memory_format=torch.channels_last)
    task, n_out = train.task, train.n_classes

    if args.mode in ("finetune", "fewshot"):
        y_score, info, model = finetune(args, encoder, (x_train, y_train), val, test, task, n_out, seed, device, log)
        if args.saliency and seed == args.seed:
            write_saliency(args, model, test)
        return y_score, info

    feats = {name: models.features(encoder, x, args.in_chans, resize=args.resize)
             for name, x in (("train", x_train), ("val", val.images), ("test", test.images))}
    if args.mode == "knn":
        return knn_probe((feats["train"], y_train), (feats["val"], val.labels), feats["test"], task, n_out)
    if args.probe == "logreg":
        return logreg_probe((feats["train"].cpu().numpy(), y_train.cpu().numpy()),
                            (feats["val"].cpu().numpy(), val.labels.cpu().numpy()), feats["test"].cpu().numpy(), task)
    head = torch.nn.Linear(models.FEATURE_DIM[args.arch], n_out).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    info = train_select(args, head, optimizer, (feats["train"], y_train), (feats["val"], val.labels),
                        lambda f: f, task, seed, log)
    return predict(head, feats["test"], lambda f: f, task), info


# ---------------------------------------------------------------- compare two result files
def compare_main(argv):
    """`evaluate.py compare A/metrics.json B/metrics.json`: per-seed test metrics of two runs side by
    side, with Welch's t-test and the two-sided Mann-Whitney U test (paper 003 App. A.3)."""
    parser = argparse.ArgumentParser("evaluate.py compare", description=compare_main.__doc__)
    parser.add_argument("a", help="metrics.json of run A")
    parser.add_argument("b", help="metrics.json of run B")
    parser.add_argument("--metrics", default="auc,acc,weighted_f1",
                        help="comma-separated test metrics to compare (default auc,acc,weighted_f1)")
    parser.add_argument("--out", default=None, help="also write the comparison to this JSON file")
    args = parser.parse_args(argv)
    runs = []
    for path in (args.a, args.b):
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}".replace("\n", " "))
        if not isinstance(result, dict) or not result.get("per_seed"):
            raise UserError(f"{path} is not a metrics.json of evaluate.py (no per_seed results)")
        runs.append(result)
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in names:
        if any(m not in s["test"] for r in runs for s in r["per_seed"]):
            raise UserError(f"metric {m!r} is not in both files; they hold {', '.join(runs[0]['per_seed'][0]['test'])}")
    rows = {m: metrics.compare_samples([s["test"][m] for s in runs[0]["per_seed"]],
                                       [s["test"][m] for s in runs[1]["per_seed"]]) for m in names}

    def fmt(p):
        return "n/a" if p is None else f"{p:.4g}"
    print(f"A: {args.a} ({runs[0].get('data')}, {runs[0].get('mode')}, {runs[0].get('encoder')})")
    print(f"B: {args.b} ({runs[1].get('data')}, {runs[1].get('mode')}, {runs[1].get('encoder')})")
    if runs[0].get("data") != runs[1].get("data"):
        print("note: the two files are results on different datasets")
    print("| metric | A mean ± std (n) | B mean ± std (n) | B - A | Welch t | p (Welch) | U | p (Mann-Whitney) |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['mean_a']:.4f} ± {r['std_a']:.4f} ({r['n_a']}) | {r['mean_b']:.4f} ± {r['std_b']:.4f} "
              f"({r['n_b']}) | {r['diff']:+.4f} | {fmt(r['welch_t'])} | {fmt(r['welch_p'])} | {fmt(r['mwu_u'])} | "
              f"{fmt(r['mwu_p'])} |")
    if min(r["n_a"] for r in rows.values()) < 2 or min(r["n_b"] for r in rows.values()) < 2:
        print("note: the tests need at least 2 seeds in each file (evaluate.py --seeds N)")
    if args.out:
        rundir.atomic_write_text(args.out, json.dumps({"a": args.a, "b": args.b, "metrics": rows}, indent=2))
        print(f"wrote {args.out}")


def main():
    if sys.argv[1:2] == ["compare"]:
        return compare_main(sys.argv[2:])
    args = resolve_args(cli.parse_args(get_args_parser()))
    device = cli.pick_device(args.device)

    # ---- data: the three splits, whole, on the device
    splits = {s: data.load_split(args.data, s, args.size, args.data_root, device, args.in_chans)
              for s in ("train", "val", "test")}
    if args.batch_size is None:
        n_train = args.shots * splits["train"].n_classes if args.mode == "fewshot" else \
            round(args.label_fraction * len(splits["train"].labels))
        args.batch_size = max(2, min(128, n_train))  # 128, or the whole training subset if smaller
    rundir.prepare_run_dir(args.out, vars(args), done_file="metrics.json")
    log_path = os.path.join(args.out, "log.jsonl")

    # ---- encoder weights, loaded once
    template = None if args.init == "random" else models.load_encoder(args.init, args.arch, args.stem, args.in_chans)

    # ---- seeded runs
    task = splits["test"].task
    y_true = splits["test"].labels.cpu().numpy()
    per_seed, scores = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        y_score, info = run_seed(args, seed, splits, template, device, lambda r: rundir.append_jsonl(log_path, r))
        test_metrics = metrics.classification_metrics(y_true, y_score, task)
        per_seed.append({"seed": seed, "test": test_metrics, **info})
        scores.append(y_score)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))

    # ---- save: metrics.json, predictions.npz, plots, and a printed table
    header = {"data": args.data, "size": args.size, "mode": args.mode, "encoder": args.init, "args": vars(args)}
    metrics.write_results(args.out, header, per_seed, y_true, scores, task, args.seed,
                          title=f"{args.data} {args.mode}, encoder {args.init}")


if __name__ == "__main__":
    cli.run_main(main)
