"""Fine-tune the top layers of a pretrained BEiT on a labelled dataset (paper 000: MedMNIST; your own
images too, docs/DATA.md).

The BEiT is Hugging Face's BeitForImageClassification. Only its top --trainable-layers transformer
layers, the pooler and a new classifier train (paper 000: 5 layers, ~63M of BEiT-large's 304M
parameters); the epoch with the best validation AUC is tested, and an interrupted run resumes at
the next seed, as evaluate.py does (common/supervised.py).

    python finetune_beit.py --data breastmnist --size 28                   # "BEiT (28)": 28 px upsampled to 224
    python finetune_beit.py --data breastmnist --size 224 --balance 0.4    # "BEiT (224) balanced", MedMNIST+ files
    python finetune_beit.py --model ./beit-large-patch16-224 --data pneumoniamnist   # a downloaded copy
"""
import argparse
import json
import os
import sys

from common import cli, flags
from common.errors import UserError

PAPER_MODEL = "microsoft/beit-large-patch16-224"
# PIL resample codes of a processor's config -> torch.nn.functional.interpolate modes
RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def get_args_parser():
    parser = argparse.ArgumentParser("finetune_beit", description=__doc__)
    cli.add_common_flags(parser, data_help="the labelled dataset: a MedMNIST 2D flag (paper 000: breastmnist, "
                                           "pneumoniamnist), an .npz, a folder or a CSV manifest (see docs/DATA.md)",
                         resnet=False)
    cli.add_evaluation_flags(parser)

    # * Model
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=PAPER_MODEL,
                   help="a BEiT id on the Hugging Face hub or a local folder saved with save_pretrained (paper 000: "
                        f"{PAPER_MODEL}: 24 layers, hidden 1024, 16 heads, 304M parameters)")
    g.add_argument("--trainable-layers", type=int, default=5,
                   help="top transformer layers that train, with the pooler and the classifier; all others stay "
                        "frozen (paper 000: 5, ~63M parameters, ~20%% of BEiT-large)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% more time")

    # * Data
    g = parser.add_argument_group("training data")
    g.add_argument("--balance", type=float, default=None,
                   help="undersample the training split's larger classes, seeded, so the minority is this share "
                        "(paper 000: 0.4 for BreastMNIST's 60/40, 0.5 for PneumoniaMNIST's 50/50); default: all images")

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="paper 000: 5")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW lr (paper 000: 3e-4)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="paper 000 tuned it per dataset without giving the value")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (paper 000 tuned it per dataset without giving the value)")
    g.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay: the classifier and pooler train at --lr, transformer layer i of L at "
                        "--lr x decay^(L + 1 - i), the embeddings at --lr x decay^(L + 1) (default 1.0: off, paper "
                        "000; BEiT's fine-tuning: 0.65 for BEiT-base, 0.75 for BEiT-large)")
    g.add_argument("--lr-schedule", default="linear", choices=list(flags.LR_SCHEDULES),
                   help="linear (default) = linear decay to 0, as the Hugging Face Trainer does by default and paper "
                        "000's Hugging Face pipeline presumably did (it does not say); constant; cosine = cosine decay to 0; "
                        "1cycle = fastai's one-cycle (up to --lr and down again); step = x0.1 at 50%% and 75%% of "
                        "the epochs")
    g.add_argument("--seeds", type=int, default=1, help="seeded repeats (seed, seed+1, ...), reported as mean ± std")
    g.add_argument("--eval-batch-size", type=int, default=128, help="images per forward pass when scoring")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import data, metrics, optim, precision, rundir, supervised


def resolve_args(args):
    if "," in args.data:
        raise UserError("finetune_beit.py takes one --data flag")
    if args.trainable_layers < 0:
        raise UserError(f"--trainable-layers must be 0 or more, got {args.trainable_layers}")
    if args.seeds <= 0:
        raise UserError(f"--seeds must be positive, got {args.seeds}")
    args.out = args.out or cli.default_out("finetune_beit", args.data)
    return args


# ---------------------------------------------------------------- model and processor
def _offline_error(name, e):
    return UserError(f"cannot load BEiT {name!r}: it is not a local folder and the Hugging Face hub is not "
                     f"reachable ({type(e).__name__}); download it where there is internet (hf download {name} "
                     f"--local-dir beit) and pass --model beit")


def _transformers():
    # MEDSSL_NO_DOWNLOAD=1 (the project's offline switch) must also stop the hub's retries, and
    # huggingface_hub reads HF_HUB_OFFLINE when it is first imported.
    if os.environ.get("MEDSSL_NO_DOWNLOAD") == "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()  # the expected "newly initialised classifier" warning
    transformers.logging.disable_progress_bar()
    return transformers


# Weight files of a save_pretrained folder, in the order transformers looks for them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Parameters a BEiT checkpoint may lack: the new classifier, and the pooler's LayerNorm (initialised to
# the identity, not at random) that pretraining-only checkpoints have no use for
NEW_PARAMETERS = ("classifier.", "beit.pooler.")


def _check_folder(name):
    """A --model folder is a BEiT saved with save_pretrained: a config.json of a BEiT and a weights
    file. Without config.json transformers would build a default BEiT-base and fine-tune it from
    random weights. Returns the weights file's name."""
    config = os.path.join(name, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{name} has no config.json, so it is no model saved with save_pretrained; pass the "
                        f"folder that holds config.json and model.safetensors")
    try:
        with open(config) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{config} is unreadable or corrupt; copy the model folder again")
    if model_type != "beit":
        raise UserError(f"{name} holds a {model_type!r} model, not a BEiT; pass a BEiT folder or hub id")
    weights = [w for w in WEIGHT_FILES if os.path.isfile(os.path.join(name, w))]
    if not weights:
        raise UserError(f"{name} has no weights ({' or '.join(WEIGHT_FILES[::2])}); copy the model folder again")
    return weights[0]


def _weights_error(name, weights, e):
    text = str(e)
    if "Weights only load failed" in text or "Unsupported global" in text:
        return UserError(f"refusing to load {os.path.join(name, weights)}: it holds pickled Python objects, not "
                         f"only tensors (it was not run); use a model.safetensors copy of the model")
    return UserError(f"{os.path.join(name, weights)} is truncated or corrupt ({type(e).__name__}); copy the model "
                     f"folder again")


def load_model(name, n_out):
    """The pretrained BEiT with a new n_out-way classifier, drawn from torch's current seed; never a
    different model than asked for: every pretrained weight but the classifier's must load."""
    transformers = _transformers()
    weights = _check_folder(name) if os.path.isdir(name) else None
    try:
        model, info = transformers.BeitForImageClassification.from_pretrained(
            name, num_labels=n_out, ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as e:
        if weights:
            raise _weights_error(name, weights, e)
        raise _offline_error(name, e)
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError of a damaged file
        if weights is None:
            raise
        raise _weights_error(name, weights, e)
    not_loaded = [k for k in [*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])]
                  if not k.startswith(NEW_PARAMETERS)]
    if not_loaded:
        raise UserError(f"{name}'s weights do not fill its BEiT ({len(not_loaded)} tensors missing or of another "
                        f"shape, first {sorted(not_loaded)[0]}): fine-tuning would start from random weights; "
                        f"pass a complete BEiT")
    return model


def load_processor(name):
    """The model's BeitImageProcessor settings (resize, rescale, normalise) as plain values; a folder
    without preprocessor_config.json gets BeitImageProcessor's defaults at the model's resolution."""
    transformers = _transformers()
    if os.path.isdir(name):
        _check_folder(name)
    try:
        processor = transformers.BeitImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        if not os.path.isdir(name):
            raise _offline_error(name, e)
        if os.path.isfile(os.path.join(name, "preprocessor_config.json")):
            raise UserError(f"{os.path.join(name, 'preprocessor_config.json')} is unreadable or corrupt; copy the "
                            f"model folder again")
        side = transformers.BeitConfig.from_pretrained(name).image_size
        print(f"note: {name} has no preprocessor_config.json; using BeitImageProcessor's defaults")
        processor = transformers.BeitImageProcessor(size={"height": side, "width": side})
    if processor.do_center_crop or processor.do_reduce_labels or not processor.do_resize:
        raise UserError(f"{name}'s image processor crops or does not resize; finetune_beit.py reproduces "
                        "resize + rescale + normalise only")
    if int(processor.resample) not in RESAMPLE:
        raise UserError(f"{name}'s image processor resamples with PIL code {int(processor.resample)}; "
                        f"supported: {sorted(RESAMPLE)} (nearest, bilinear, bicubic)")
    return {"size": (processor.size["height"], processor.size["width"]), "mode": RESAMPLE[int(processor.resample)],
            "scale": float(processor.rescale_factor), "normalize": bool(processor.do_normalize),
            "mean": list(processor.image_mean), "std": list(processor.image_std)}


def _beit_layers(model):
    return model.beit.layers if hasattr(model.beit, "layers") else model.beit.encoder.layer  # transformers 5 / 4


def beit_layer_ids(model):
    """(layer_of, n_layers) of a BeitForImageClassification for optim.layer_decay_groups, as BEiT numbers
    them: the embeddings 0, transformer layer i (from 0) i + 1, the pooler and classifier n_layers =
    depth + 1."""
    depth = len(_beit_layers(model))
    prefix = "beit.layers." if hasattr(model.beit, "layers") else "beit.encoder.layer."

    def layer_of(name):
        if name.startswith("beit.embeddings."):
            return 0
        return int(name[len(prefix):].split(".")[0]) + 1 if name.startswith(prefix) else depth + 1
    return layer_of, depth + 1


def train_top_layers(model, k):
    """Freeze everything but the top k encoder layers, the pooler and the classifier (paper 000).
    Models without a pooler (use_mean_pooling false) pool through beit.layernorm, which then trains
    in its place. Returns (trainable, total) parameter counts."""
    model.requires_grad_(False)
    layers = _beit_layers(model)
    if k > len(layers):
        raise UserError(f"--trainable-layers {k} is more than the model's {len(layers)} layers")
    top = [model.classifier, model.beit.pooler or model.beit.layernorm, *layers[len(layers) - k:]]
    for module in top:
        module.requires_grad_(True)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    return count(p for p in model.parameters() if p.requires_grad), count(model.parameters())


# ---------------------------------------------------------------- batched preprocessing on the device
def resize_like_pil(x, size, mode):
    """uint8 (B, 3, H, W) -> uint8 (B, 3, *size) as BeitImageProcessor's PIL resize gives it.
    On the CPU, torch's antialiased uint8 kernels are Pillow's own algorithm (identical output).
    Other devices have no uint8 kernels, so the float kernels run as Pillow does: width first,
    rounded to uint8, then height (measured: 28 -> 224 px bicubic differs by one grey level in
    ~0.04% of pixels)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True)
    x = F.interpolate(x.float(), size=(x.shape[-2], size[1]), mode=mode, antialias=True).round_().clamp_(0, 255)
    return F.interpolate(x, size=size, mode=mode, antialias=True).round_().clamp_(0, 255).to(torch.uint8)


def beit_inputs(images, prep):
    """uint8 (B, C, H, W) on the device -> the pixel_values the model's BeitImageProcessor makes of the
    same images: gray repeated to RGB (PIL's convert("RGB")), resized, rescaled, normalised."""
    x = resize_like_pil(images.expand(-1, 3, -1, -1), prep["size"], prep["mode"]).float() * prep["scale"]
    if prep["normalize"]:
        mean = torch.tensor(prep["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(prep["std"], device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


# ---------------------------------------------------------------- one seeded fine-tuning run
def beit_forward(model, prep, autocast):
    """uint8 images -> the BEiT's logits: preprocessing on the device, bf16 autocast where on."""
    def forward(images):
        with autocast():
            return model(pixel_values=beit_inputs(images, prep)).logits
    return forward


def run_seed(args, seed, splits, prep, device, log, arithmetic):
    """One seed of the run: its SeedRun, every forward pass under the autocast of the Precision `arithmetic`."""
    cli.seed_everything(seed)  # the new classifier's init, the batches and the undersampling
    train, val, test = splits["train"], splits["val"], splits["test"]
    task = train.task
    # paper 000: a binary task is one logit with binary cross-entropy (supervised.classification_loss)
    model = load_model(args.model, 1 if task == metrics.BINARY else train.n_classes)
    n_trainable, n_total = train_top_layers(model, args.trainable_layers)
    tqdm.write(f"seed {seed}: trainable parameters {n_trainable:,} of {n_total:,} "
               f"({100 * n_trainable / n_total:.1f}%)", file=sys.stdout)
    model.to(device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    forward = beit_forward(model, prep, lambda: arithmetic.autocast(device.type))

    idx = np.arange(len(train.labels))
    if args.balance is not None:
        idx = data.undersample_indices(train.labels, args.balance, seed)
    idx = torch.as_tensor(idx, device=device)
    subset = supervised.subset_record(seed, train, idx)
    supervised.check_batch_size(args.batch_size, len(idx))
    # layer-wise lr decay (BEiT, Bao et al. 2022): the top layers' lr, lower ones decayed (1.0: one lr)
    layer_of, n_layers = beit_layer_ids(model)
    groups = optim.layer_decay_groups(model.named_parameters(), layer_of, n_layers, args.lr, args.layer_decay,
                                      args.weight_decay)
    optimizer = optim.adam(groups, args.lr, args.weight_decay, device, decoupled=True)
    # LayerNorm, not BatchNorm: the last, partial batch is kept, as the Hugging Face Trainer does; and
    # the whole model trains in training mode, as the Trainer does (stochastic depth on in frozen layers)
    schedule = supervised.Schedule(epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
                                   lr=args.lr, lr_schedule=args.lr_schedule, full_batches=False,
                                   eval_batch_size=args.eval_batch_size)
    chosen = supervised.train_select(model, optimizer, supervised.Examples(train.images, train.labels, idx),
                                     supervised.Examples(val.images, val.labels), task, seed, schedule, forward,
                                     log=log)

    # the checkpoint: only the trainable weights (of the best epoch, on the CPU) + the config
    trainable = {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}
    rundir.save_checkpoint({"trainable": trainable, "config": model.config.to_dict(),
                           "meta": {"method": "beit", "model": args.model, "trainable_layers": args.trainable_layers,
                                    "seed": seed, "best_epoch": chosen.best_epoch, "val_auc": chosen.val_auc}},
                          os.path.join(args.out, f"checkpoint_seed{seed}.pt"))
    y_score = supervised.probabilities(model, test.images, task, forward, args.eval_batch_size)
    val_score = supervised.probabilities(model, val.images, task, forward, args.eval_batch_size)
    return supervised.SeedRun(y_score, {**chosen.info(), "trainable_params": n_trainable, "total_params": n_total,
                                        **subset}, val_score)


def load_finetuned(ckpt, model=None):
    """A fine-tuned BEiT back from checkpoint_seed<N>.pt: the frozen weights from `model` (default:
    the --model it was trained from), the trainable ones from the checkpoint."""
    state = rundir.load_checkpoint(ckpt)
    net = load_model(model or state["meta"]["model"], len(state["config"]["id2label"]))
    missing = set(state["trainable"]) - set(dict(net.named_parameters()))
    if missing:
        raise UserError(f"{ckpt} does not fit {model or state['meta']['model']}: no {sorted(missing)[0]} there")
    net.load_state_dict(state["trainable"], strict=False)
    return net.eval()


def main():
    args = resolve_args(cli.parse_args(get_args_parser()))
    device = cli.pick_device(args.device)

    # ---- data: the three splits, whole, as uint8 on the device; resized batch by batch
    options = data.options_from(vars(args))
    splits = {s: data.load_split(args.data, s, args.size, args.data_root, device, options=options)
              for s in ("train", "val", "test")}
    info = splits["test"].info  # task and class names: the dataset's own description
    positive = supervised.positive_class(args.positive_class, info)
    prep = load_processor(args.model)
    side = min(prep["size"])  # what the BEiT sees
    precision.resolve(args.precision, device, side)  # --precision bf16 on a GPU without it: refused before the run dir

    # ---- run directory: an --overwrite re-run moves the old run aside until this one has started
    rundir.prepare_run_dir(args.out, vars(args), done_file="metrics.json",
                           inputs=rundir.provenance({args.data: info.hash}))

    # ---- the arithmetic of every forward pass (common/precision.py; a ViT: no convolutions to lay out
    # channels_last); a resumed run keeps that of its finished seeds
    seeds = list(range(args.seed, args.seed + args.seeds))
    arithmetic = supervised.seeds_precision(args.out, seeds, args.precision, device, side, convolutional=False)

    # ---- seeded runs, each saved as it ends; then metrics.json, predictions.npz and the plots
    name = f"BEiT ({args.size})" + (" balanced" if args.balance is not None else "")
    header = {"data": args.data, "data_hash": info.hash, "size": args.size, "mode": "finetune_beit", "encoder": name,
              "model": args.model, "class_names": list(info.class_names), "grouping": getattr(info, "grouping", None),
              "args": vars(args), "file_names": data.split_files(info, "test")}  # to predictions.npz
    supervised.run_seeds(args.out, seeds, lambda seed, log: run_seed(args, seed, splits, prep, device, log, arithmetic),
                         splits["test"].labels.cpu().numpy(), info.task, header,
                         title=f"{args.data} {name}", epochs_per_seed=args.epochs,
                         class_names=info.class_names, positive_class=positive,
                         y_val=splits["val"].labels.cpu().numpy(), precision=arithmetic)


if __name__ == "__main__":
    cli.run_main(main)
