"""What the flags offer (choices, defaults quoted in help, the --aug names) and the flags of own
images, in a module that imports no torch: every script parses its command line before loading torch,
so --help, --version and a mistyped flag answer at once. The modules that implement these values
(optim, models, data) take them from here; augment's presets and menu, which it defines with their
code, are repeated here and checked against it by tests/test_startup.py."""
import argparse

# common.optim
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
LR_SCHEDULES = ("constant", "cosine", "1cycle", "step", "linear")
BARLOW_BIAS_LR_RATIO = 0.0048 / 0.2  # Barlow Twins' LARS: biases and BatchNorm at 0.0048 for weights at 0.2

# common.models: the stages of a ResNet that --freeze names
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# common.augment: the presets of --aug, the steps of a paper 002 menu (in their order), the
# fine-tuning augmentations, and DINO's crop areas (Caron et al. 2021 §3.1)
AUG_PRESETS = ("byol", "paper001", "byol+", "simclr", "moco_v2", "paper002", "paper003")
AUG_MENU = ("base", "vflip", "equalize", "blur", "perspective", "rotation", "brightness", "contrast", "noise")
PAPER002_MENU = "base+vflip+equalize+perspective+blur+noise"
FINETUNE_AUG = ("none", "paper003")
GLOBAL_CROP_SCALE = (0.4, 1.0)
LOCAL_CROP_SCALE = (0.05, 0.4)

# common.data: own images
CROPS = ("center", "pad", "stretch")
POLICIES = ("zero", "one", "error")
SPLIT_RATIO = (0.8, 0.1, 0.1)


def aug_spec(text):
    """argparse type of --aug: a preset name or a '+'-joined menu of AUG_MENU names, each once,
    refused at parse time (a config value too) with augment.views' words."""
    text = str(text)
    if text in AUG_PRESETS:
        return text
    choices = f"name a preset ({', '.join(AUG_PRESETS)}) or join any of {', '.join(AUG_MENU)} with '+'"
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty augmentation: {choices}")
    names = [n.strip() for n in text.split("+")]
    unknown = [n for n in names if n not in AUG_MENU]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation {unknown[0]!r} in {text!r}: {choices}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"augmentation named twice in {text!r}")
    return text


def split_ratio(text):
    """argparse type of --split-ratio: "80/10/10" or "0.8,0.1,0.1" -> fractions summing to 1."""
    try:
        parts = [float(p) for p in str(text).replace(",", "/").split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive parts train/val/test, e.g. 80/10/10, got {text!r}")
    return tuple(p / sum(parts) for p in parts)


def add_data_flags(group):
    """The flags of own images (folders, CSV manifests, npz files) on an argparse group; their dests are
    common.data.DataOptions' fields, so data.options_from(vars(args)) collects them."""
    group.add_argument("--split-ratio", type=split_ratio, default=SPLIT_RATIO, metavar="TRAIN/VAL/TEST",
                       help="split drawn (seeded, stratified by class) for class folders or a CSV without a split "
                            "column, stored with the cache (default 80/10/10)")
    group.add_argument("--label-columns", type=lambda t: tuple(c.strip() for c in t.split(",") if c.strip()),
                       default=(), metavar="A,B,...",
                       help="CSV manifest: these 0/1 columns are the labels of a multi-label task (CheXpert-style)")
    group.add_argument("--uncertain-label", dest="uncertain", default="error", choices=POLICIES,
                       help="CSV multi-label cells of -1 (uncertain): error (default), or read as zero or one "
                            "(CheXpert's U-Zeros / U-Ones)")
    group.add_argument("--blank-label", dest="blank", default="zero", choices=POLICIES,
                       help="CSV multi-label blank cells (not mentioned): zero (default), one or error")
    group.add_argument("--group-column", default=None, metavar="NAME",
                       help="keep each patient's images in one split. CSV manifest: the column of patient ids "
                            "(default: a column named patient_id, patient, subject_id, subject or group, if any); "
                            "class folders: 'folder' reads DIR/<class>/<patient>/...; an npz: its *_groups arrays; "
                            "'none': image by image")
    group.add_argument("--allow-group-leak", action="store_true",
                       help="use a given split (split column, split folders, npz) even if it puts one patient in "
                            "two splits; a warning says how many (default: refused)")
    group.add_argument("--crop", default="center", choices=CROPS,
                       help="own images to square before the resize: center crop (default), pad with black, stretch")
    group.add_argument("--cache-dir", default=None,
                       help="where own images are cached as npz (default $MEDSSL_CACHE, else .medssl-cache beside "
                            "the data)")
    group.add_argument("--host-memory", action="store_true",
                       help="keep the images in pinned host memory and copy each batch to the GPU (automatic when "
                            "a split does not fit in GPU memory)")
    return group
