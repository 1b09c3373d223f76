"""Flags, YAML configs and one-line user errors: what every script's command line shares."""
import argparse
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import yaml


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""


def run_main(main):
    """Call main(); turn a UserError into `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def add_common_flags(parser, data_help="MedMNIST 2D flag, e.g. pneumoniamnist", resnet=True):
    """The data / model / run flags every script shares (DESIGN.md); each script adds its own
    optimisation flags next to these so their help can quote its paper. resnet=False leaves out
    --arch / --stem / --in-chans (finetune_beit.py's model is named by --model)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="pneumoniamnist", help=data_help)
    g.add_argument("--size", type=int, default=28, help="image side: 28, 64, 128 or 224 (MedMNIST+)")
    g.add_argument("--data-root", default=None,
                   help="folder with <flag>[_<size>].npz; default $MEDMNIST_ROOT, else ~/.medmnist")
    if resnet:
        g = parser.add_argument_group("model")
        g.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="backbone (default resnet18)")
        g.add_argument("--stem", default=None, choices=["imagenet", "small"],
                       help="imagenet = torchvision's 7x7/2 conv + max-pool (paper 001, default); "
                            "small = 3x3/1 conv, no max-pool (MedMNIST 28 px benchmark)")
        g.add_argument("--in-chans", type=int, default=None, choices=[1, 3],
                       help="input channels (default 3: gray images are repeated; 1 keeps them gray)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (init, batches, augmentation)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--out", default=None, help="run directory (default runs/<script>-<data>-<time>)")
    g.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch, for smoke runs")
    g.add_argument("--config", default=None, help="YAML file of flag values; flags given on the command line win")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    return parser


def add_pretrain_flags(parser):
    """The flags every pretraining script shares: monitoring, checkpoints, speed and torchrun."""
    g = parser.add_argument_group("monitoring, checkpoints and torchrun")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N epochs, log the kNN AUC (k = 20) on the validation split of the first --data "
                        "flag, its train labels being the kNN memory (default 0: never)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the per-epoch records and the per-step loss and lr as TensorBoard events "
                        "in <out>/tensorboard (default off)")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimiser steps inside an epoch (default 0: at epoch ends only): "
                        "a run killed mid-epoch then loses at most N steps, and the same command continues it "
                        "bit-exactly; every checkpoint rewrites the whole file (180 MB for BYOL with ResNet-18), "
                        "so pick N worth minutes of work")
    g.add_argument("--save-seconds", type=float, default=0, metavar="S",
                   help="write the epoch-end checkpoint only when S seconds have passed since the last one, and "
                        "always after the last epoch (default 0: every epoch); on a GPU a 28 px epoch takes "
                        "seconds and the checkpoint's write about as long, so e.g. 300 saves most of that time "
                        "and loses at most 5 minutes to a kill")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA; default off)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm normalises with the statistics of the global batch, as one "
                        "process does (the papers trained on one GPU), instead of each rank's rows "
                        "(torch.nn.SyncBatchNorm on CUDA, an equivalent on the CPU); no effect in one process")
    return parser


def parse_args(parser, argv=None):
    """Parse flags, with --config YAML values as defaults, then validate the shared ones."""
    argv = sys.argv[1:] if argv is None else argv
    first, _ = parser.parse_known_args(argv)
    if first.config:
        try:
            with open(first.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config {first.config}: {e}".replace("\n", " "))
        if not isinstance(values, dict):
            raise UserError(f"config {first.config} must be a mapping of flag: value")
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config {first.config} has unknown keys {unknown}; "
                            f"valid keys are the script's flags (see --help)")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "lr"):
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {args.max_steps}")
    if getattr(args, "save_every", 0) < 0:
        raise UserError(f"--save-every must be 0 (epoch ends only) or positive, got {args.save_every}")
    return args


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out(script, data):
    import time
    return os.path.join("runs", f"{script}-{data.replace(',', '+')}-{time.strftime('%Y%m%d-%H%M%S')}")


def lr_or_auto(text):
    """argparse type of --lr: a number, or "auto" for an LR range test."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}")


# The running loop's position (out, epoch, step, saved), kept up to date by the training loops so that an
# interrupted run can say where it stopped.
progress = {}
