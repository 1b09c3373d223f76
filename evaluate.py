"""Evaluate an encoder on a labelled dataset (a MedMNIST flag or your own images, docs/DATA.md): linear
probe, fine-tune, few-shot or kNN.

The encoder comes from a pretraining checkpoint (--ckpt) or a baseline init (--init random|imagenet|
<.pth>). Training uses the train split (or a seeded subset of it), the epoch (or probe strength, or
k) is chosen by validation AUC, and the test split is scored once. Each seed's result is saved as it
ends (seed_<N>.json) and metrics.json last: the same command run again on an interrupted run goes on
at the next seed.

    python evaluate.py --ckpt runs/x/checkpoint.pt --data pneumoniamnist --mode linear_probe --seeds 3
    python evaluate.py --init random --data breastmnist --mode finetune --seeds 3
    python evaluate.py --init random --arch vit_tiny_patch16_224 --data breastmnist --mode finetune --layer-decay 0.75
    python evaluate.py --ckpt runs/x/checkpoint.pt --data breastmnist --mode finetune --freeze layer3
    python evaluate.py --config configs/paper003_further_finetune.yaml --ckpt runs/x/checkpoint.pt --data dermamnist
"""
import argparse
import copy
import json
import os

from common import cli, flags
from common.errors import UserError

# Per-mode defaults of paper 001 (§5.2-5.4): fine-tune 25 epochs at 1e-3, few-shot 25-50 epochs
# at 1e-2 on 20 samples, linear probe 50 epochs at 1e-2.
# precise_bn is ours, not paper 001's, and on in every mode that trains BatchNorm: see --precise-bn
# and docs/SCRIPTS.md's table of fine-tuning at 1, 10 and 100% of the labels.
MODE_DEFAULTS = {"finetune": {"epochs": 25, "lr": 1e-3, "precise_bn": "on"},
                 "fewshot": {"epochs": 50, "lr": 1e-2, "precise_bn": "on"},
                 "linear_probe": {"epochs": 50, "lr": 1e-2}, "knn": {"epochs": 1, "lr": 1.0}}
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried by the fast linear probe
KNN_K = (5, 10, 20, 50)


def get_args_parser():
    parser = argparse.ArgumentParser("evaluate", description=__doc__)
    cli.add_common_flags(parser, data_help="the labelled dataset to evaluate on: a MedMNIST 2D flag, an .npz, a "
                                           "folder or a CSV manifest (see docs/DATA.md)")
    cli.add_evaluation_flags(parser)
    size = next(a for a in parser._actions if a.dest == "size")
    size.default, size.help = None, (size.help + "; default: the size the --ckpt encoder was pretrained at, else 28 "
                                     "(a different size is used as asked, with a warning)")

    # * What to evaluate
    g = parser.add_argument_group("encoder and protocol")
    g.add_argument("--ckpt", default=None, help="checkpoint.pt of a pretrain_<method>.py run (its --arch, --stem, "
                   "--in-chans, --patch-size and --pool come with it)")
    g.add_argument("--init", default=None, help="baseline encoder without --ckpt: random | imagenet | <.pth> "
                   "(a torchvision ResNet's or, with a timm --arch, a timm-layout .pth / .safetensors) (default "
                   "random; paper 001's base model: imagenet)")
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
    g.add_argument("--class-weight", default="none", choices=["none", "balanced"],
                   help="balanced: weight the training loss by n / (classes x n_class) (scikit-learn's 'balanced'), "
                        "so a rare class counts as much as a common one; every mode but knn (default none: the "
                        "decision threshold chosen on validation already serves the minority class)")
    g.add_argument("--temperature-scaling", action="store_true",
                   help="fit one temperature on the validation split's probabilities (Guo et al. 2017) and report "
                        "calibration (ECE, Brier) and thresholded metrics of the scaled probabilities (default off)")

    # * Optimisation (defaults per mode: MODE_DEFAULTS above)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default: finetune 25, fewshot 50, sgd probe 50 (paper 001)")
    g.add_argument("--lr", type=cli.lr_or_auto, default=None,
                   help="Adam lr for finetune (1e-3) / fewshot (1e-2), SGD lr for the sgd probe (1e-2) (paper 001 §5.4); "
                        "auto (finetune, fewshot): an LR range test per seed picks the peak lr (paper 003 §3.4)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="finetune, fewshot, sgd probe: default 128, or the training subset drawn if smaller "
                        "(kNN and the logreg probe see the training set whole)")
    g.add_argument("--weight-decay", type=float, default=1e-6,
                   help="L2 weight decay of Adam (finetune, fewshot) and of the sgd probe's SGD (default 1e-6, "
                        "paper 001 §5.4: 'I consistently used L2 regularization by setting the weight decay to "
                        "1e-6'); the logreg probe chooses its own L2 strength on validation, kNN has none")

    # * Fine-tuning recipes of papers 002 and 003 (finetune and fewshot modes)
    g = parser.add_argument_group("fine-tuning recipes (papers 002, 003; finetune and fewshot modes)")
    g.add_argument("--freeze", default="none", choices=["none", *flags.STAGES],
                   help="freeze the encoder up to and including this stage (paper 002's study): layer3 trains "
                        "layer4 + the head, layer4 the head alone, stem layer1-4 + the head; a ViT's stem is its "
                        "patch embedding, its blocks in 4 groups are layer1-4")
    g.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay: the head trains at --lr, the encoder's layer i of L at --lr x "
                        "decay^(L + 1 - i) (ViT: its blocks; ResNet: stem, layer1-4) (default 1.0: off, paper 001; "
                        "ViT fine-tuning: BEiT and MAE 0.65 for ViT-B, 0.75 for ViT-L)")
    g.add_argument("--frozen-bn", default="eval", choices=["eval", "train"],
                   help="BatchNorm in frozen stages: eval = running statistics, left untouched (default); "
                        "train = batch statistics, running statistics updated (weights frozen either way)")
    g.add_argument("--head-epochs", type=int, default=0,
                   help="first train the head alone for N epochs on the frozen encoder, Adam at --head-lr "
                        "(paper 003 §3.4: 1), then the main phase")
    g.add_argument("--val-every", type=int, default=1, metavar="N",
                   help="validate after every N-th epoch and the last, the epoch kept chosen among those (default "
                        "1). With few labels an epoch is one step and validation most of its cost: 5 at 1%% of "
                        "PneumoniaMNIST's labels makes a 100-epoch run 1.8x faster on a CPU")
    g.add_argument("--head-lr", type=float, default=2e-3,
                   help="Adam lr of the head-only epochs (default 2e-3, fastai's fine_tune value; paper 003 "
                        "names a fixed Adam lr without its value)")
    g.add_argument("--lr-schedule", default="constant", choices=list(flags.LR_SCHEDULES),
                   help="lr schedule of the main phase: constant (paper 001); cosine = cosine decay to 0 (paper "
                        "002); 1cycle = fastai's one-cycle, up to --lr and down again, momentum inversely (paper "
                        "003); step = x0.1 at 50%% and 75%% of the epochs (MedMNIST v2's protocol); linear = linear "
                        "decay to 0 (the Hugging Face Trainer's)")
    g.add_argument("--lr-range", type=float, nargs=3, default=[1e-7, 10.0, 100], metavar=("START", "END", "STEPS"),
                   help="sweep of --lr auto (fastai's lr_find: 1e-7 10 100)")
    g.add_argument("--train-aug", default="none", choices=sorted(flags.FINETUNE_AUG),
                   help="augmentation of the training batches: none (paper 001), paper003 (random crop, rotation, "
                        "flip, App. A.1)")
    g.add_argument("--tta", type=int, default=0,
                   help="test-time augmentation: average the class probabilities of K passes augmented with "
                        "--train-aug (paper 003: 3; 0 = off)")
    g.add_argument("--precise-bn", default=None, choices=["on", "off"],
                   help="before each validation, recompute BatchNorm's running statistics over the training images "
                        "(default on; off = paper 001's fine-tuning). With few steps per epoch the running averages "
                        "lag the weights and the eval-mode network outputs one class (measured: test AUC 0.50 "
                        "without, 0.78-0.80 with, PneumoniaMNIST 20 shots; fine-tuning at 1 and 10%% of the labels: "
                        "docs/SCRIPTS.md)")
    g.add_argument("--saliency", type=int, default=0, metavar="N",
                   help="finetune / fewshot: write saliency.npz, Grad-CAM and occlusion maps of the first seed's "
                        "model on the first N test images for their true class (paper 002's figure; 0 = off)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from common import augment, data, errors, figures, metrics, models, optim, precision, rundir, saliency, supervised


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
                       ("--saliency", args.saliency), ("--precise-bn", args.precise_bn == "on"),
                       ("--val-every", args.val_every != 1)):
        if used and not full_model:
            raise UserError(f"{flag} applies to --mode finetune / fewshot, not {args.mode}")
    if args.resize is not None and args.resize <= 0:
        raise UserError(f"--resize must be a positive image side, got {args.resize}")
    if args.head_epochs < 0 or args.tta < 0:
        raise UserError("--head-epochs and --tta must be 0 or more")
    if args.tta and args.train_aug == "none":
        raise UserError("--tta averages augmented passes: name the augmentation with --train-aug paper003")
    if args.class_weight != "none" and args.mode == "knn":
        raise UserError("--class-weight weights a training loss; knn has none: drop it or choose another --mode")
    if args.temperature_scaling and args.mode == "knn":
        raise UserError("--temperature-scaling needs class probabilities from a model; knn votes: drop it")
    if args.layer_decay != 1.0 and not full_model:
        raise UserError(f"--layer-decay applies to --mode finetune / fewshot, not {args.mode}")
    args.out = args.out or cli.default_out(f"evaluate-{args.mode}", args.data)
    vars(args).update(models.resolve_encoder(args.ckpt, args.init, args.arch, args.stem, args.in_chans,
                                             args.patch_size, args.pool, args.size, args.resize))
    if args.saliency and not (args.arch in models.RESNETS):
        raise UserError(f"--saliency's Grad-CAM reads a ResNet stage; --arch {args.arch} has none: drop --saliency")
    return args


# ---------------------------------------------------------------- probes on frozen features
def logreg_probe(train, val, test, task, class_weight="none"):
    """Logistic regression on standardised frozen features, L2 strength chosen on validation
    (supervised.selection_score: the AUC, or the loss where the AUC is undefined)."""
    (f_train, y_train), (f_val, y_val), f_test = train, val, test
    scaler = StandardScaler().fit(f_train)
    f_train, f_val, f_test = scaler.transform(f_train), scaler.transform(f_val), scaler.transform(f_test)
    best = (-np.inf, None, None, None)
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=2000, class_weight=None if class_weight == "none" else class_weight)
        clf = OneVsRestClassifier(clf) if task == metrics.MULTI_LABEL else clf
        clf.fit(f_train, y_train)
        score, val_auc = supervised.selection_score(y_val, clf.predict_proba(f_val), task)
        if score > best[0]:
            best = (score, val_auc, c, clf)
    return supervised.SeedRun(best[3].predict_proba(f_test), _selected({"val_auc": best[1], "C": best[2]}),
                              best[3].predict_proba(f_val))


def knn_probe(train, val, test, task, n_classes):
    (f_train, y_train), (f_val, y_val), f_test = train, val, test
    scores = {k: supervised.selection_score(y_val.cpu().numpy(), metrics.knn_scores(f_train, y_train, f_val, k, task,
                                                                                  n_classes), task) for k in KNN_K}
    k = max(scores, key=lambda k: scores[k][0])
    return supervised.SeedRun(metrics.knn_scores(f_train, y_train, f_test, k, task, n_classes),
                              _selected({"val_auc": scores[k][1], "k": k}),
                              metrics.knn_scores(f_train, y_train, f_val, k, task, n_classes))


def _selected(info):
    return info if info["val_auc"] is not None else {**info, "selected_on": "val_loss"}


# ---------------------------------------------------------------- the arithmetic of the forward passes
def resolve_precision(args, device, images):
    """The Precision (common/precision.py) of --precision on `device` for the side the encoder sees:
    --resize, else that of `images`. main() checks the request with it before the run directory exists;
    the run's own (supervised.seeds_precision, which keeps that of the finished seeds on a resume) is
    resolved once and handed to the functions below."""
    return precision.resolve(args.precision, device, args.resize or images.shape[-1],
                             convolutional=not models.vit_arch(args.arch))


def classifier_forward(model, in_chans, resize, arithmetic, steps=None, generator=None):
    """forward(uint8 images) -> float32 logits of `model` (losses and metrics stay float32): the images
    augmented per image with the augment.FINETUNE_AUG `steps` (if any, drawn from `generator`) as [0, 1]
    floats, then normalised (data.to_input), in the memory layout of the Precision `arithmetic`, under
    its autocast."""
    def forward(images):
        x = augment.apply_steps(images.float().div_(255), steps, generator) if steps else images
        x = data.to_input(x, in_chans, resize).contiguous(memory_format=arithmetic.memory_format)
        with arithmetic.autocast(x.device.type):
            return model(x).float()
    return forward


# ---------------------------------------------------------------- fine-tuning (finetune, fewshot)
def schedule(args, epochs=None, lr=None):
    """The supervised.Schedule of this command (epochs: another phase's count)."""
    return supervised.Schedule(epochs=epochs or args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
                               lr=lr, lr_schedule=args.lr_schedule, precise_bn=args.precise_bn == "on",
                               frozen_bn=args.frozen_bn, val_every=args.val_every)


def finetune(args, encoder, train, val, test, task, n_out, seed, device, log, arithmetic, class_weight=None):
    """Encoder + linear head trained on `train` (supervised.Examples), the epoch chosen on
    validation, the test split scored, every forward pass in the Precision `arithmetic`. Paper 002's --freeze keeps the stem .. that stage fixed; paper 003's recipe
    (§3.4) is --head-epochs 1 (head alone), then --lr auto (range test) with --lr-schedule 1cycle,
    with --train-aug paper003 and --tta 3. Returns (SeedRun, model)."""
    model = torch.nn.Sequential(encoder, torch.nn.Linear(models.feature_dim(encoder), n_out)).to(device)
    aug_gen = torch.Generator(device).manual_seed(seed)
    steps_aug = augment.FINETUNE_AUG[args.train_aug]
    forward = classifier_forward(model, args.in_chans, args.resize, arithmetic)
    forward_aug = classifier_forward(model, args.in_chans, args.resize, arithmetic, steps_aug, aug_gen)
    forward_train = forward_aug if steps_aug else forward
    val = supervised.Examples(val.images, val.labels)
    info = {}

    # ---- paper 003 §3.4: the head alone first, encoder frozen (its BN too, with --frozen-bn eval)
    if args.head_epochs:
        models.freeze_through(encoder, "layer4")
        head_opt = optim.adam(model[1].parameters(), args.head_lr, args.weight_decay, device)
        head = supervised.train_select(model, head_opt, train, val, task, seed, schedule(args, args.head_epochs),
                                       forward, forward_train=forward_train,
                                       log=lambda r: log({"phase": "head", **r}), class_weight=class_weight)
        info["head_val_auc"] = head.val_auc

    # ---- main phase: the encoder from --freeze on, and the head
    info["trainable_params"] = models.freeze_through(encoder, args.freeze) + \
        sum(p.numel() for p in model[1].parameters())
    lr = args.lr
    if lr == "auto":
        lr = range_test_lr(args, model, train, forward_train, task, seed, class_weight)
        info["lr_found"] = lr
    # layer-wise lr decay (BEiT, MAE): the head (model[1]) at the top, model[0]'s layers below it
    layer_of, n_layers = models.layer_ids(encoder)
    groups = optim.layer_decay_groups(model.named_parameters(), lambda name: layer_of(name.removeprefix("0.")),
                                      n_layers, lr, args.layer_decay, args.weight_decay)
    optimizer = optim.adam(groups, lr, args.weight_decay, device)
    chosen = supervised.train_select(model, optimizer, train, val, task, seed,
                                     schedule(args, lr=None if args.lr_schedule == "constant" else lr),
                                     forward, forward_train=forward_train, log=log, class_weight=class_weight)
    info.update(chosen.info())

    def scores(images):  # the validation split scored as the test split is (TTA included)
        if args.tta:
            return np.mean([supervised.probabilities(model, images, task, forward_aug) for _ in range(args.tta)],
                           axis=0)
        return supervised.probabilities(model, images, task, forward)
    test_score = scores(test.images)  # first: the TTA draws of the test split do not depend on validation
    return supervised.SeedRun(test_score, info, scores(val.inputs)), model


def range_test_lr(args, model, train, forward_train, task, seed, class_weight=None):
    """--lr auto: an LR range test of the parameters about to be trained (model state restored
    afterwards), on batches drawn with their own generator; curve and pick saved per seed."""
    supervised.enter_training(model, args.frozen_bn)
    params = [p for p in model.parameters() if p.requires_grad]
    device = supervised.model_device(model)
    optimizer = optim.adam(params, args.lr_range[0], args.weight_decay, device)
    gen = torch.Generator(device).manual_seed(seed + 1)
    batch = min(args.batch_size, len(train))

    def batch_loss():
        idx = torch.randint(len(train), (batch,), generator=gen, device=device)
        idx = idx if train.index is None else train.index[idx]
        return supervised.classification_loss(forward_train(data.batch(train.inputs, idx, device)), train.labels[idx],
                                              task, class_weight)
    start, end, steps = args.lr_range
    lrs, losses, lr = optim.lr_range_test(batch_loss, optimizer, [model], start, end, int(steps))
    name = os.path.join(args.out, f"lr_range_seed{seed}")
    rundir.atomic_write_text(name + ".json", json.dumps({"lrs": lrs, "losses": losses, "chosen": lr}))
    figures.plot_lr_range(lrs, losses, lr, name + ".png", title=f"LR range test, seed {seed}")
    return lr


def write_saliency(args, model, test, arithmetic):
    """--saliency N: where the fine-tuned model looks on the first N test images (the same images in
    every run, so scripts/report.py can put two models' maps side by side), for each image's true
    class (its first positive label when multi-label), with the model's prediction (`predicted`: the
    argmax of its class probabilities). Maps are stored at the stored image size. In float32, whatever
    the run's Precision (`arithmetic`: only its memory layout is taken):
    occlusion maps are differences of probabilities, which bf16's 8 significant bits would blur."""
    device = supervised.model_device(model)
    memory_format = arithmetic.memory_format
    images, labels = data.batch(test.images, slice(0, args.saliency), device), test.labels[:args.saliency]
    target = labels.argmax(dim=1) if labels.ndim == 2 else labels
    x = data.to_input(images, args.in_chans, args.resize)
    side, layer = x.shape[-1], saliency.deepest_spatial_stage(model[0], x)
    maps = {"gradcam": saliency.gradcam(model, getattr(model[0], layer), x, target),
            "occlusion": saliency.occlusion_sensitivity(model, x, target, patch=max(2, side // 7),
                                                        stride=max(1, side // 14))}
    maps = {k: torch.nn.functional.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
            for k, m in maps.items()}
    predicted = supervised.probabilities(model, images, test.task, lambda b: model(
        data.to_input(b, args.in_chans, args.resize).contiguous(memory_format=memory_format))).argmax(axis=1)
    np.savez(os.path.join(args.out, "saliency.npz"), images=images.cpu().numpy(), index=np.arange(len(images)),
             class_idx=target.cpu().numpy(), predicted=predicted, layer=layer,
             **{k: m.cpu().numpy() for k, m in maps.items()})


# ---------------------------------------------------------------- one seeded run
def training_indices(args, labels, seed):
    """The training images of one seed: --shots per class, or a stratified --label-fraction."""
    if args.mode == "fewshot":
        return data.few_shot_indices(labels, args.shots, seed)
    return data.label_fraction_indices(labels, args.label_fraction, seed)


def run_seed(args, seed, splits, template, device, log, arithmetic):
    """One seed of the run: its SeedRun, every forward pass in the Precision `arithmetic`."""
    cli.seed_everything(seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    idx = torch.as_tensor(training_indices(args, train.labels, seed), device=device)
    y_train = train.labels[idx]  # the images stay where they are (maybe host memory): batches are gathered
    # a random init must differ per seed; a loaded one is the same weights every time
    encoder = models.build_encoder(args.arch, args.stem, args.in_chans, args.encoder_size, args.patch_size,
                                   args.pool) if args.init == "random" \
        else copy.deepcopy(template)
    arithmetic.prepare(encoder, device, args.in_chans, args.resize or train.images.shape[-1])
    task, n_out = train.task, train.n_classes
    subset = supervised.subset_record(seed, train, idx)
    class_weight = supervised.class_weights(y_train, task, n_out) if args.class_weight == "balanced" else None

    if args.mode in ("finetune", "fewshot"):
        supervised.check_batch_size(args.batch_size, len(idx))
        result, model = finetune(args, encoder, supervised.Examples(train.images, train.labels, idx), val, test, task,
                                 n_out, seed, device, log, arithmetic, class_weight)
        if args.saliency and seed == args.seed:
            write_saliency(args, model, test, arithmetic)
        return with_info(result, subset)

    feats = {name: models.features(encoder, split.images, args.in_chans, resize=args.resize, index=index,
                                   precision=arithmetic)  # float32 features, whatever the arithmetic
             for name, split, index in (("train", train, idx), ("val", val, None), ("test", test, None))}
    if args.mode == "knn":
        return with_info(knn_probe((feats["train"], y_train), (feats["val"], val.labels), feats["test"], task, n_out),
                         subset)
    if args.probe == "logreg":
        return with_info(logreg_probe((feats["train"].cpu().numpy(), y_train.cpu().numpy()),
                                      (feats["val"].cpu().numpy(), val.labels.cpu().numpy()),
                                      feats["test"].cpu().numpy(), task, args.class_weight), subset)
    # paper 001's SGD head, on features standardised with the training subset's mean and std, as the
    # logreg probe's are (MAE §A.2 standardises with a BatchNorm without affine): raw features of a random
    # init differ in scale by orders of magnitude, and an SGD head at one lr then measures the lr, not them
    supervised.check_batch_size(args.batch_size, len(idx))
    # a feature constant on a few training images keeps its scale (scikit-learn's StandardScaler does
    # the same): divided by ~0 it would turn validation and test noise into huge inputs
    mean, std = feats["train"].mean(dim=0), feats["train"].std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    feats = {name: (f - mean) / std for name, f in feats.items()}
    head = torch.nn.Linear(feats["train"].shape[1], n_out).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    chosen = supervised.train_select(head, optimizer, supervised.Examples(feats["train"], y_train),
                                     supervised.Examples(feats["val"], val.labels), task, seed, schedule(args),
                                     head, log=log, class_weight=class_weight)
    return supervised.SeedRun(supervised.probabilities(head, feats["test"], task), {**chosen.info(), **subset},
                              supervised.probabilities(head, feats["val"], task))


def with_info(result, info):
    """A SeedRun with more per-seed keys."""
    return supervised.SeedRun(result.y_score, {**result.info, **info}, result.val_score)


def pretraining_record(path):
    """What metrics.json records of a --ckpt encoder: its method, the epochs it finished of those it
    was run for, and the size and channels it was pretrained on. An unfinished run says so."""
    meta, epoch = models.checkpoint_meta(path)
    pretrained = meta.get("args", {})
    record = {"method": meta.get("method"), "epoch": epoch, "epochs": pretrained.get("epochs"),
              "size": meta.get("size", pretrained.get("size")), "in_chans": meta["in_chans"], "arch": meta["arch"],
              "stem": meta["stem"], "patch_size": meta.get("patch_size"), "pool": meta.get("pool"),
              "input_scaling": meta.get("input_scaling", models.INPUT_SCALING)}
    if isinstance(epoch, int) and isinstance(record["epochs"], int) and epoch < record["epochs"]:
        print(f"note: {errors.escape(path)} is an unfinished pretraining run (epoch {epoch} of {record['epochs']}); "
              f"its encoder is evaluated as it stands, and metrics.json records the epoch", flush=True)
    return record


def uses_batches(args):
    """kNN and the logistic-regression probe see the training set whole: no batch size."""
    return args.mode in ("finetune", "fewshot") or args.probe == "sgd"


def main():
    args = resolve_args(cli.parse_args(get_args_parser()))
    device = cli.pick_device(args.device)

    # ---- data: the three splits, whole, on the device (or in pinned host memory when too large);
    # task and class names from the dataset's own description
    options = data.options_from(vars(args))
    splits = {s: data.load_split(args.data, s, args.size, args.data_root, device, args.in_chans, options=options)
              for s in ("train", "val", "test")}
    info = splits["test"].info
    positive = supervised.positive_class(args.positive_class, info)
    if args.batch_size is None and uses_batches(args):  # from the subset drawn (its size is the same every seed)
        args.batch_size = supervised.default_batch_size(len(training_indices(args, splits["train"].labels, args.seed)))

    # ---- encoder weights, loaded once (before the run directory: a bad --init changes nothing there)
    template = None if args.init == "random" else models.load_encoder(
        args.init, args.arch, args.stem, args.in_chans, size=args.encoder_size, patch_size=args.patch_size,
        pool=args.pool)
    pretraining = pretraining_record(args.ckpt) if args.ckpt else None
    side = args.resize or splits["train"].images.shape[-1]  # what the encoder sees
    resolve_precision(args, device, splits["train"].images)  # --precision bf16 on a GPU without it: refused before the run dir

    # ---- run directory: an --overwrite re-run moves the old run aside until this one has started
    inputs = rundir.provenance({args.data: info.hash}, encoder=args.init,
                               epoch=pretraining["epoch"] if pretraining else None)
    rundir.prepare_run_dir(args.out, vars(args), done_file="metrics.json", inputs=inputs)

    # ---- the arithmetic of every forward pass (common/precision.py); a resumed run keeps that of its finished seeds
    seeds = list(range(args.seed, args.seed + args.seeds))
    arithmetic = supervised.seeds_precision(args.out, seeds, args.precision, device, side,
                                            convolutional=not models.vit_arch(args.arch))

    # ---- seeded runs, each saved as it ends; then metrics.json, predictions.npz and the plots
    full = args.mode in ("finetune", "fewshot")
    epochs = args.epochs + args.head_epochs if full else (args.epochs if uses_batches(args) else 0)
    header = {"data": args.data, "data_hash": info.hash, "size": args.size, "mode": args.mode, "encoder": args.init,
              "backbone": {"arch": args.arch, "stem": args.stem, "in_chans": args.in_chans,
                           "patch_size": args.patch_size, "pool": args.pool},
              "class_names": list(info.class_names), "grouping": getattr(info, "grouping", None),
              "pretraining": pretraining, "args": vars(args),
              # to predictions.npz, not metrics.json: each prediction traced to its image where the data names files
              "file_names": data.split_files(info, "test")}
    supervised.run_seeds(args.out, seeds, lambda seed, log: run_seed(args, seed, splits, template, device, log,
                                                                      arithmetic),
                         splits["test"].labels.cpu().numpy(), info.task, header,
                         title=f"{args.data} {args.mode}, encoder {args.init}", epochs_per_seed=epochs,
                         class_names=info.class_names, positive_class=positive,
                         y_val=splits["val"].labels.cpu().numpy(), temperature_scaling=args.temperature_scaling,
                         precision=arithmetic)


if __name__ == "__main__":
    cli.run_main(main)
