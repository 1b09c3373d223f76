"""Flags, YAML configs, one-line user errors, and what a run reports when it is interrupted: what
every script's command line shares."""
import argparse
import errno
import math
import os
import random
import signal
import sys
import tempfile
from typing import NamedTuple

import yaml

# no torch at the top: scripts parse their flags (parse_early) before torch loads, which takes
# seconds; the few functions here that need torch import it
from common import __version__, errors, flags, loggers, preemption
from common.errors import UserError, escape, progress


EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _raise_interrupt(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    raise KeyboardInterrupt(signum)


def reports_here(interrupt=False):
    """Whether this process prints the one line of an error or an interrupt. Under torchrun every rank
    meets the same bad input or signal and a dead peer leaves every other rank failing: the first
    rank of the run to get here reports (a marker file per torchrun run, created atomically). With
    RANK set but no torchrun run id, rank 0 reports an interrupt (every rank got the signal) and every
    rank its errors (they may be its own). Every rank still exits with the code."""
    if "RANK" not in os.environ:
        return True
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return os.environ["RANK"] == "0" or not interrupt
    # the launching agent's PID too: it is every local rank's parent and new at each launch, where a
    # multi-node command without --rdzv-id repeats the same run id, address and port every time
    key = "-".join([*(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")),
                    str(os.getppid())])
    marker = os.path.join(tempfile.gettempdir(), f"medssl-reported-{escape(run_id).replace(os.sep, '_')}-{key}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError:
        return os.environ["RANK"] == "0"


def _is_local_module(name):
    """A module of this repository (a bug if it is missing, not a package to install)."""
    top = (name or "").split(".")[0]
    return top in ("common", "scripts", "tests") or os.path.exists(os.path.join(_REPO, top + ".py"))


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dist():
    """torch.distributed if a process group is up, else None (without loading torch: a script that
    never loaded it has no group)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _peer_died(e):
    """A collective that failed because another torchrun process is gone (gloo: the connection
    closed or was reset; NCCL: a DistBackendError), as opposed to a bug in this process."""
    dist = _dist()
    if dist is None or not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return (isinstance(e, getattr(dist, "DistBackendError", ())) or "gloo" in text.lower()
            or any(w in text for w in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                       "NCCL communicator was aborted", "Socket Timeout")))


# what to do about an OSError, by errno
_OS_FIXES = {
    errno.ENOSPC: "free some space (the disk or your quota is full), or choose a folder on another disk",
    errno.EDQUOT: "free some space (your quota is full), or choose a folder on another disk",
    errno.EFBIG: "the file is larger than this system or your limits allow (ulimit -f); choose another disk",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENAMETOOLONG: "use a shorter file or folder name (most file systems allow 255 bytes a name)",
    errno.ENOENT: "check that the path exists, or create its folder first",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder where a file was expected: fix the path",
    errno.EILSEQ: "the name has characters this file system cannot store: rename it to plain ASCII",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "the disk reported an I/O error: check it, or choose another disk",
}


def environment_line(e):
    """The one line for a fault of the environment that reached run_main uncaught, or None for
    anything else (a bug: its traceback is wanted). An OSError names its path, errno's message and a
    fix; a missing optional package names what to pip install; a dead torchrun peer says so. Each says
    what of the run is kept."""
    if isinstance(e, errors.ReportedElsewhere):
        return ""
    if _peer_died(e):
        first = escape(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        reason = first if len(first) <= 160 else first[:157] + "..."
        return (f"error: another torchrun process stopped ({reason}); this one "
                f"{progress.interrupted_message('stopped')}")
    if isinstance(e, ModuleNotFoundError) and e.name and not _is_local_module(e.name):
        package = errors.pip_name(e.name)
        return f"error: this run needs the package {package}, which is not installed: pip install {package}"
    if isinstance(e, OSError) and e.errno is not None:
        what = e.strerror or os.strerror(e.errno)
        fix = _OS_FIXES.get(e.errno, "check the path and the disk, then run the same command again")
        path = f"{escape(os.fsdecode(e.filename))}: " if e.filename is not None else ""
        if e.filename2 is not None:
            path += f"{escape(os.fsdecode(e.filename2))}: "
        kept = f"; {progress.interrupted_message('stopped')}" if progress.out is not None else ""
        return f"error: {path}{what}; {fix}{kept}"
    return None


_held = {}


def _hold_signals():
    """Ignore SIGINT and SIGTERM while the line is made and printed: torchrun stops the other ranks
    with SIGTERM the moment one fails, and raised half-way that would lose the line. _release_signals
    puts the handlers back, so that a further signal still stops a cleanup that hangs."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            _held.setdefault(signum, signal.signal(signum, signal.SIG_IGN))
        except ValueError:  # not the main thread
            pass


def _release_signals():
    while _held:
        signum, handler = _held.popitem()
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _say(line, interrupt=False):
    if line and reports_here(interrupt):
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr itself is gone (a closed pipe): the exit code still tells
            pass
    _release_signals()


def run_main(main):
    """Call main(). A UserError becomes `error: ...` on stderr and exit code 2; SIGINT (Ctrl-C) and
    SIGTERM become one line saying where the run stopped and what is kept, exit code 130 / 143.
    Faults of the environment (environment_line: an OSError, a missing package, a dead torchrun
    peer) become one line and exit code 2. Under torchrun the line is printed once per run
    (reports_here), the exit code on every rank. A run directory that --overwrite moved aside is put
    back unless the new run got going (rundir.finish_overwrite)."""
    for stream in (sys.stdout, sys.stderr):  # a path with undecodable bytes, or the C locale, never crashes a print
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    signal.signal(signal.SIGTERM, _raise_interrupt)
    preemption.install()  # SIGUSR1, and SIGTERM under SLURM: a training loop stops at a step's end
    ok = False
    try:
        main()
        ok = True
    except UserError as e:
        _hold_signals()
        _say(f"error: {escape(e)}")  # one line, whatever a file's strings held
        sys.exit(2)
    except preemption.Preempted:
        _hold_signals()
        tail = preemption.requeue()  # under SLURM, rank 0
        # every rank stops at the same step; rank 0, which requeued, tells
        rank_0 = os.environ.get("RANK", "0") == "0"
        _say(progress.interrupted_message("stopped by SIGUSR1") + tail if rank_0 else None)
        sys.exit(preemption.EXIT_PREEMPTED)
    except KeyboardInterrupt as e:
        _hold_signals()
        signum = e.args[0] if e.args and e.args[0] in EXIT_SIGNAL else signal.SIGINT
        _say(progress.interrupted_message(), interrupt=True)  # under torchrun every rank gets the signal: one line
        sys.exit(EXIT_SIGNAL[signum])
    except BrokenPipeError:  # the reader of stdout is gone (| head): nothing to tell, as if SIGPIPE had ended it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        sys.exit(128 + signal.SIGPIPE)
    except Exception as e:
        _hold_signals()
        line = environment_line(e)
        if line is None:
            _release_signals()
            raise
        _say(line)
        sys.exit(2)
    finally:
        try:
            if "common.rundir" in sys.modules:  # else no run directory was touched
                sys.modules["common.rundir"].finish_overwrite(ok)
        finally:
            dist = _dist()
            if dist is not None:
                try:
                    dist.destroy_process_group()
                except Exception:  # a dead peer's group may not close cleanly; the process ends anyway
                    pass


# ---------------------------------------------------------------- flags
def one_line_errors(parser):
    """argparse's own errors (a bad type or choice, an unknown flag) as one line, exit code 2,
    without the usage block: `error: --epochs: invalid int value: 'ten'`. Every parser goes through
    here, so this is also where --version is added."""
    def error(message):
        print(f"error: {message.removeprefix('argument ')}; see --help", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    if "--version" not in parser._option_string_actions:
        parser.add_argument("--version", action="version", version=f"MedSSL {__version__}",
                            help="print MedSSL's version and exit")
    return parser


def parse_early(get_args_parser, argv=None, ranges=None):
    """Parse the command line exactly as main() will (parse_args: --config, ranges), before the script
    imports torch: --help and --version answer (exit 0) and bad flags give the usual one line (exit 2)
    in a fraction of a second. It runs outside run_main, so it prints a UserError itself. On success
    the script goes on to its heavy imports and main() parses again."""
    try:
        parse_args(get_args_parser(), argv, ranges)
    except UserError as e:
        _say(f"error: {escape(e)}")
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default: " (default: X)" appended unless the help already names its
    default, or there is none to show (None, off, an empty list). Descriptions keep their layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default == argparse.SUPPRESS
                or (isinstance(default, (list, tuple)) and not default) or not action.option_strings):
            return text
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
            if isinstance(default, (list, tuple)) else (f"{default:g}" if isinstance(default, float) else default)
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def add_common_flags(parser, data_help="a MedMNIST 2D flag, an .npz, a folder or a CSV manifest (see docs/DATA.md)",
                     resnet=True):
    """The data / model / run flags every script shares, the flags of own images among
    them (common.flags.add_data_flags), and the help formatter that shows every default; each script
    adds its own optimisation flags next to these so their help can quote its paper. resnet=False
    leaves out the model flags --arch / --stem / --in-chans / --patch-size / --pool (finetune_beit.py's
    model is named by --model)."""
    one_line_errors(parser)
    parser.formatter_class = HelpFormatter
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="pneumoniamnist", help=data_help)
    g.add_argument("--size", type=int, default=28,
                   help="image side; MedMNIST: 28, 64, 128 or 224; own images: any side")
    g.add_argument("--data-root", default=None,
                   help="folder with <flag>[_<size>].npz; default $MEDMNIST_ROOT, else ~/.medmnist")
    flags.add_data_flags(g)
    if resnet:
        g = parser.add_argument_group("model")
        g.add_argument("--arch", default=None, metavar="NAME",
                       help="backbone (default resnet18): resnet18 or resnet50 (torchvision), or any timm model name, "
                            "e.g. vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, convnext_atto, "
                            "efficientnet_b0 (python -c \"import timm; print(timm.list_models('vit_*'))\" lists "
                            "them); a ViT is built for --size with --patch-size patches. DINO and MAE: ViT-S/16 and "
                            "ViT-B/16 at 224 px; MedMNIST+: ViT-B/16")
        g.add_argument("--stem", default=None, choices=["imagenet", "small"],
                       help="a ResNet's stem: imagenet = torchvision's 7x7/2 conv + max-pool (paper 001, default); "
                            "small = 3x3/1 conv, no max-pool (MedMNIST 28 px benchmark); timm models have their own")
        g.add_argument("--in-chans", type=int, default=None, choices=[1, 3],
                       help="input channels (default 3: gray images are repeated; 1 keeps them gray)")
        g.add_argument("--patch-size", type=int, default=None,
                       help="a ViT's patch side in px, dividing --size (default: 4 up to 32 px, i.e. 7 x 7 patches "
                            "at 28 px; 8 up to 96 px; 16 above); the name's /16 is the 224 px value of the papers "
                            "(DINO, MAE: ViT-S/16, ViT-B/16 at 224 px; MedMNIST+: ViT-B/16)")
        g.add_argument("--pool", default=None, choices=["cls", "mean"],
                       help="a ViT's features: cls = its class token (default; DINO, MAE's linear probe) or mean = "
                            "the mean of its patch tokens (MAE's fine-tuning); other encoders average-pool")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (init, batches, augmentation)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="arithmetic of the forward passes: bf16 autocast or float32 (weights, losses, BatchNorm "
                        "statistics and checkpoints stay float32); auto = bf16 on a GPU, and on a CPU with native "
                        "bf16 (AVX512-BF16, AMX) from 48 px up, where it is faster; float32 elsewhere")
    g.add_argument("--out", default=None, help="run directory (default runs/<script>-<data>-<time>)")
    g.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch, for smoke runs")
    g.add_argument("--config", default=None, help="YAML file of flag values; flags given on the command line win")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished or different run in --out (the old one is kept aside until the new "
                        "one has written its first checkpoint or finished, and put back if it fails before)")
    return parser


def set_defaults(parser, notes=None, **defaults):
    """A script's defaults for flags defined elsewhere (argparse's set_defaults), and `notes` appended to
    those flags' help by dest: what the script's paper says of them, beside the default --help shows."""
    parser.set_defaults(**defaults)
    notes = dict(notes or {})
    for action in parser._actions:
        if action.dest in notes:
            note = notes.pop(action.dest)
            action.help = f"{action.help}; {note}" if action.help else note
    if notes:
        raise ValueError(f"notes for flags the parser does not have: {', '.join(sorted(notes))}")
    return parser


def add_pretrain_flags(parser):
    """The flags every pretraining script shares: monitoring, checkpoints, speed and torchrun."""
    g = parser.add_argument_group("monitoring, checkpoints and torchrun")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N epochs, log the kNN AUC (k = 20) on the validation split of the first --data "
                        "flag, its train labels being the kNN memory (default 0: never)")
    _add_logger_flags(g, "the per-epoch records and the per-step loss and lr")
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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the step's forward_loss (both views through the networks, heads and loss) "
                        "and its backward, with CUDA graphs (mode reduce-overhead) on one GPU; the first steps "
                        "compile (a minute or more), later epochs reuse the graph; pretrain_barlow.py compiles once "
                        "more after --freeze-encoder-epochs, when other parameters become trainable (default off)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm normalises with the statistics of the global batch, as one "
                        "process does (the papers trained on one GPU), instead of each rank's rows "
                        "(torch.nn.SyncBatchNorm on CUDA, an equivalent on the CPU); no effect in one process")
    return parser


def pretrain_parser(title, doc, data_default="pneumoniamnist"):
    """A pretraining script's parser before its own flags: data, model and run (add_common_flags),
    then views, optimisation, and monitoring / checkpoints / torchrun (add_pretrain_flags). A method sets
    its defaults with set_defaults (their papers' values in the help) and adds a group of its own flags."""
    parser = argparse.ArgumentParser(title, description=doc)
    add_common_flags(parser, data_help="dataset(s) whose train images are the unlabeled corpus: MedMNIST 2D "
                     "flags, .npz files, folders or CSV manifests (docs/DATA.md), several joined by commas")
    parser.set_defaults(data=data_default, arch="resnet18", stem="imagenet", in_chans=3)

    # * Views
    g = parser.add_argument_group("views")
    g.add_argument("--aug", default="simclr", type=flags.aug_spec,
                   help="view augmentations: a preset (" + ", ".join(flags.AUG_PRESETS) + ") or a menu of "
                        + "+".join(flags.AUG_MENU) + " joined by '+', applied in that order with paper 002's values")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (none given: the preset's, 0.08 1 in most; small images may "
                        "want a larger MIN)")

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--init", default="random",
                   help="encoder's initial weights: random | imagenet | <checkpoint.pt or .pth>")
    g.add_argument("--epochs", type=int, default=100, help="epochs")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, split evenly over torchrun's processes")
    g.add_argument("--optimizer", default="adam", choices=flags.OPTIMIZERS,
                   help="adam; adamw (decoupled weight decay); sgd (momentum 0.9); lars (SGD with layer-wise "
                        "adaptive rates; biases and BatchNorm get neither weight decay nor the scaling)")
    g.add_argument("--lr", type=lr_or_auto, default=1e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="weight decay")
    g.add_argument("--lr-schedule", default="cosine", choices=flags.LR_SCHEDULES,
                   help="cosine = linear warm-up over --warmup-epochs, then cosine decay to --final-lr-fraction x "
                        "--lr; constant; 1cycle = fastai's one-cycle, up to --lr and down again; step = x0.1 at 50%% "
                        "and 75%% of the epochs; linear = linear decay to 0")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs of --lr-schedule cosine")
    g.add_argument("--final-lr-fraction", type=float, default=0.0, metavar="F",
                   help="where --lr-schedule cosine ends, as a fraction of --lr")
    add_pretrain_flags(parser)
    return parser


def add_ema_flags(parser, momentum, schedule="constant"):
    """--ema and --ema-schedule: the momentum of a method's target (momentum) encoder, common.ema."""
    g = parser.add_argument_group("momentum encoder")
    g.add_argument("--ema", type=float, default=momentum,
                   help="momentum (EMA decay) of the target encoder: target <- m x target + (1 - m) x online "
                        "after every optimiser step")
    g.add_argument("--ema-schedule", default=schedule, choices=["constant", "cosine"],
                   help="constant m, or a cosine from m to 1 over training (Grill et al. §3.2, Caron et al. §3.1)")
    return g


def add_evaluation_flags(parser):
    """The flags evaluate.py and finetune_beit.py share: which class of a binary task is positive,
    and TensorBoard."""
    g = parser.add_argument_group("reporting")
    g.add_argument("--positive-class", default="1", metavar="INDEX|NAME",
                   help="binary tasks: the class whose precision, recall (sensitivity), F1 and ROC curve are "
                        "reported, as an index or a class name (default 1, medmnist's convention; e.g. for "
                        "BreastMNIST 0 = malignant, 1 = normal, benign); specificity is the other class's recall")
    _add_logger_flags(g, "the per-epoch records (train loss, validation AUC, lr), tagged by seed (e.g. seed0/val_auc)")
    return parser


def _add_logger_flags(group, what):
    group.add_argument("--logger", nargs="+", default=[], choices=list(loggers.MODULES), metavar="NAME",
                       help=f"also log {what} to these trackers (default: none): tensorboard (<out>/tensorboard), "
                            "wandb (Weights & Biases; WANDB_MODE=offline logs to <out>/wandb alone), mlflow "
                            "($MLFLOW_TRACKING_URI, else <out>/mlruns); a resumed run continues the same W&B and "
                            "MLflow runs (docs/CLUSTER.md)")
    group.add_argument("--tensorboard", action="store_true", help="the same as --logger tensorboard (default off)")


# ---------------------------------------------------------------- ranges of the numeric flags
class Range(NamedTuple):
    """Allowed values of a numeric flag: lo .. hi, each end open or closed, always finite."""
    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    words: str = ""  # instead of the text made from the bounds

    def holds(self, v):
        return (math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def text(self):
        if self.words:
            return self.words
        if self.hi != math.inf:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo == 0:
            text = "positive and finite" if self.lo_open else "0 or more"
        else:  # the flags starting at 1 are counts
            text = "positive" if (self.lo, self.lo_open) == (1, False) else f"at least {self.lo:g}"
        return text + (f" ({self.why})" if self.why else "")


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
FRACTION = Range(0, 1)                 # decays and probabilities
SHARE = Range(0, 1, lo_open=True)      # a share of something that must not be empty

# Every numeric flag of every script, by argparse dest (a script without the flag skips it). Values
# of flags with nargs (--crop-scale, --lr-range) are checked one by one, then by ORDERED below.
RANGES = {
    # data and run
    "size": AT_LEAST_1, "resize": AT_LEAST_1, "patch_size": AT_LEAST_1,
    "seed": Range(0, 2 ** 32, hi_open=True, words="in [0, 2**32) (numpy's seeds)"),
    "seeds": AT_LEAST_1, "max_steps": AT_LEAST_1, "save_every": AT_LEAST_0, "save_seconds": AT_LEAST_0, "eval_every": AT_LEAST_0,
    "val_every": AT_LEAST_1,
    "label_fraction": SHARE, "shots": AT_LEAST_1, "balance": Range(0, 0.5, lo_open=True),
    # optimisation
    "epochs": AT_LEAST_1, "lr": POSITIVE, "lr_biases": POSITIVE, "head_lr": POSITIVE, "freeze_lr": POSITIVE,
    "batch_size": Range(2, why="BatchNorm needs 2 or more images to train"), "eval_batch_size": AT_LEAST_1,
    "weight_decay": AT_LEAST_0, "layer_decay": SHARE, "warmup_epochs": AT_LEAST_0, "head_epochs": AT_LEAST_0,
    "freeze_encoder_epochs": AT_LEAST_0, "lr_range": POSITIVE, "tta": AT_LEAST_0, "saliency": AT_LEAST_0,
    # methods
    "ema": FRACTION, "crop_scale": SHARE, "temperature": POSITIVE, "lambd": AT_LEAST_0, "sparsity": AT_LEAST_0,
    "projector_hidden": AT_LEAST_1, "projector_out": AT_LEAST_1, "predictor_hidden": AT_LEAST_1,
    "trainable_layers": AT_LEAST_0, "final_lr_fraction": FRACTION, "queue_size": AT_LEAST_0, "bn_splits": AT_LEAST_1,
    "invariance_weight": AT_LEAST_0, "variance_weight": AT_LEAST_0, "covariance_weight": AT_LEAST_0,
    "mask_ratio": Range(0, 1, lo_open=True, hi_open=True), "decoder_depth": AT_LEAST_1, "decoder_width": AT_LEAST_1,
    "decoder_heads": AT_LEAST_1,
    "local_crops": AT_LEAST_0, "local_size": AT_LEAST_1, "local_crop_scale": SHARE, "out_dim": AT_LEAST_1,
    "head_hidden": AT_LEAST_1, "head_bottleneck": AT_LEAST_1, "freeze_last_layer": AT_LEAST_0,
    "student_temp": POSITIVE, "teacher_temp": POSITIVE, "warmup_teacher_temp": POSITIVE,
    "warmup_teacher_temp_epochs": AT_LEAST_0, "center_momentum": FRACTION, "weight_decay_end": AT_LEAST_0,
    "clip_grad": AT_LEAST_0,
}
# Flags with several values that must come in order: (first, second) positions and the reason.
ORDERED = {"crop_scale": (0, 1, "MIN <= MAX"), "local_crop_scale": (0, 1, "MIN <= MAX"),
           "lr_range": (0, 1, "START < END")}


def check_ranges(args, ranges=None):
    """Raise a UserError naming the first flag of `args` outside its range (RANGES, updated by
    `ranges`); None values (defaults filled in later) and words such as --lr auto pass."""
    table = {**RANGES, **(ranges or {})}
    for name, allowed in table.items():
        value = getattr(args, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        flag = "--" + name.replace("_", "-")
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not allowed.holds(v):
                raise UserError(f"{flag} must be {allowed.text()}, got {v}")
        if name in ORDERED and isinstance(value, (list, tuple)):
            i, j, rule = ORDERED[name]
            a, b = value[i], value[j]
            if a > b or (a == b and "<=" not in rule):
                raise UserError(f"{flag} needs {rule}, got {' '.join(f'{v:g}' for v in value)}")
    if getattr(args, "lr_range", None) and args.lr_range[2] < 2:
        raise UserError(f"--lr-range STEPS must be 2 or more, got {args.lr_range[2]:g}")


# ---------------------------------------------------------------- configs
def _config_value(parser, action, value, path, key):
    """A YAML value through exactly its flag's checks: as the command-line strings argparse would
    get, through the action's type and choices."""
    where = f"config {path}: {key}"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value  # the key is the flag's dest: its value, not whether the flag was given
    strings = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if isinstance(value, dict) or (action.nargs is None and len(strings) != 1):
        raise UserError(f"{where}: expected one value, got {value!r}")
    if isinstance(action.nargs, int) and len(strings) != action.nargs:
        raise UserError(f"{where}: expected {action.nargs} values, got {value!r}")
    try:
        converted = parser._get_values(action, strings)  # the type and choices checks argparse runs
    except argparse.ArgumentError as e:
        raise UserError(f"{where}: {e.message}")
    return converted


# A config holds flags: far under these. Bigger is a mistake (a data file given as --config) or an
# attack; YAML aliases are refused outright, as nested ones expand exponentially ("billion laughs":
# 337 bytes made a 44 MB value) and a config of flags never needs them.
CONFIG_MAX_BYTES = 256 * 1024
CONFIG_MAX_STRING = 4096     # characters of one value (PATH_MAX on Linux)
CONFIG_MAX_ITEMS = 1000      # values of one list


def _check_config_size(values, path):
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if len(items) > CONFIG_MAX_ITEMS:
            raise UserError(f"config {path}: {escape(key)} has {len(items)} values, more than the "
                            f"{CONFIG_MAX_ITEMS} any flag takes; fix the file")
        for item in items:
            if isinstance(item, (str, bytes)) and len(item) > CONFIG_MAX_STRING:
                raise UserError(f"config {path}: {escape(key)} is {len(item)} characters long, more than "
                                f"{CONFIG_MAX_STRING}; fix the file")


def _read_config(parser, path):
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
        if len(raw) > CONFIG_MAX_BYTES:
            raise UserError(f"config {path} is over {CONFIG_MAX_BYTES // 1024} KiB: a config of flags is a few "
                            f"lines; is it the right file?")
        text = raw.decode("utf-8")
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is expanded yet
            if isinstance(event, yaml.AliasEvent):
                raise UserError(f"config {path} uses a YAML alias (*{escape(event.anchor)}); write each value out, "
                                f"a config of flags needs no anchors or aliases")
        values = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read config {path}: {escape(first)}; fix the file or drop --config")
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    _check_config_size(values, path)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"config {path} has unknown keys {unknown}; "
                        f"valid keys are the script's flags (see --help)")
    return {k: _config_value(parser, actions[k], v, path, k) for k, v in values.items()}


def parse_args(parser, argv=None, ranges=None):
    """Parse flags, with --config YAML values as defaults (checked as the flags are), then check
    every numeric value against its range (check_ranges; `ranges` overrides RANGES entries)."""
    one_line_errors(parser)
    argv = sys.argv[1:] if argv is None else argv
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):  # the scripts/ tools have no --config
        parser.set_defaults(**_read_config(parser, first.config))
    args = parser.parse_args(argv)
    # tuples (e.g. --split-ratio) as lists: args.yaml reads them back as lists, and a resumed run
    # compares its flags with those
    for name, value in vars(args).items():
        if isinstance(value, tuple):
            setattr(args, name, list(value))
    check_ranges(args, ranges)
    if hasattr(args, "logger"):  # --tensorboard is --logger tensorboard; the trackers import before the run dir
        args.logger = loggers.chosen(args.logger, args.tensorboard)
        for name in args.logger:
            errors.require(loggers.MODULES[name], "--tensorboard" if name == "tensorboard" and args.tensorboard
                    else f"--logger {name}")
    if getattr(args, "saliency", 0):
        errors.require("captum.attr", "--saliency")
    return args


def pick_device(name):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed):
    import numpy as np
    import torch
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
