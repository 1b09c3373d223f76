"""Export the encoder of a pretraining run: its weights alone in one safetensors file, and a folder in
timm's Hugging Face hub format with a model card.

A checkpoint.pt holds every module of the run (projector, predictor, EMA or teacher copies, decoder) and
the optimizer's state. The export keeps its `encoder`, the one evaluate.py evaluates, in float32 and in
the layout of the library that builds it: a torchvision ResNet without `fc` (the same keys as timm's
ResNet), or a timm model with num_classes=0. Nothing is trained or changed.

    python export.py --ckpt runs/byol/checkpoint.pt
    python export.py --ckpt runs/byol/checkpoint.pt --metrics runs/byol-probe --metrics runs/byol-finetune
    hf upload <user>/<model> runs/byol/export/hf .

It writes into --out (default: export/ beside the checkpoint):
    encoder.safetensors   the encoder's weights, with the run's settings as metadata
    hf/config.json        timm's config: architecture, model arguments, input size, normalisation
    hf/model.safetensors  the same weights, as timm.create_model("local-dir:<out>/hf", pretrained=True)
                          or "hf-hub:<user>/<model>" loads them
    hf/README.md          the model card: method, data, epochs, input scaling, --metrics results, loading
It prints the lines that load each file (docs/OUTPUTS.md).
"""
import argparse
import os

from common import cli

# what export.py writes into --out, and nothing else: an --out holding anything more is not ours
ENCODER_FILE = "encoder.safetensors"
HF_DIR = "hf"
HF_FILES = ("config.json", "model.safetensors", "README.md")
# fields of timm's pretrained_cfg that describe where its own weights came from
SOURCE_KEYS = ("origin_url", "paper_ids", "paper_name", "notes", "description", "hf_hub_id", "hf_hub_filename",
               "url", "file", "source")


def get_args_parser():
    parser = argparse.ArgumentParser("export", description=__doc__)
    cli.one_line_errors(parser)
    parser.formatter_class = cli.HelpFormatter
    parser.set_defaults(config=None)  # cli.parse_args reads --config, which this script does not take

    # * Input
    g = parser.add_argument_group("input")
    g.add_argument("--ckpt", required=True, help="checkpoint.pt of a pretrain_<method>.py run")
    g.add_argument("--metrics", action="append", default=[], metavar="PATH",
                   help="an evaluate.py run folder or its metrics.json, whose per-seed test results go into the "
                        "model card; repeat for several (default: none)")

    # * Output
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="folder for the files (default: export/ beside --ckpt); one holding other files is refused")
    g.add_argument("--rgb", action="store_true",
                   help="a 1-channel encoder's first convolution summed out to 3 channels (each weight divided by "
                        "3 and repeated): the same features for gray images repeated to RGB, and loadable where "
                        "3 channels are assumed, e.g. torchvision's resnet18() as it is (default: off)")

    # * Model card
    g = parser.add_argument_group("model card")
    g.add_argument("--license", default="other",
                   help="the card's license id; choose one your data's terms allow (e.g. cc-by-4.0, that of most "
                        "MedMNIST subsets)")
    g.add_argument("--dataset", action="append", default=None, metavar="ID",
                   help="the card's datasets (hub ids); repeat for several (default: the run's MedMNIST flags; own "
                        "images are not named)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import json
import math
import re
import shutil
import tempfile

import torch

from common import models, rundir
from common.errors import UserError, escape


# ---------------------------------------------------------------- the checkpoint's encoder
def read_encoder(path):
    """(meta, epoch, state) of a MedSSL pretraining checkpoint: its checked metadata, the epochs it had
    finished, and its encoder's state dict; a one-line UserError for any other file."""
    checkpoint = rundir.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "meta" not in checkpoint:
        raise UserError(f"{escape(path)} is not a MedSSL checkpoint (it has no 'meta'); pass the checkpoint.pt "
                        f"of a pretrain_<method>.py run")
    models.check_meta(checkpoint["meta"], path, None, None, None)
    state = checkpoint.get("encoder")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        held = ", ".join(escape(k) for k in checkpoint if isinstance(checkpoint.get(k), dict)) or "none"
        raise UserError(f"{escape(path)} holds no encoder (its entries: {held}); pass the checkpoint.pt of a "
                        f"pretrain_<method>.py run")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{escape(path)}'s encoder holds NaN or inf (first in {escape(bad[0])}); export a "
                        f"checkpoint of a run that did not diverge")
    return checkpoint["meta"], checkpoint.get("epoch"), state


def build(meta, in_chans):
    """The encoder the run trained (models.build_encoder from its metadata), for `in_chans` channels."""
    return models.build_encoder(meta["arch"], meta["stem"], in_chans, meta.get("size", 28), meta.get("patch_size"),
                                meta.get("pool"))


def load_strict(encoder, state, path):
    """`state` into `encoder`, every key and shape matching, or a one-line UserError; the encoder in eval mode."""
    wanted = encoder.state_dict()
    clash = [k for k, v in state.items() if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if clash or missing or unexpected:
        what = (f"{clash[0]} is {tuple(state[clash[0]].shape)}, not {tuple(wanted[clash[0]].shape)}" if clash else
                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise UserError(f"{escape(path)}'s encoder does not fit the {escape(type(encoder).__name__)} its meta names "
                        f"({escape(what)}); the file is damaged or not a MedSSL checkpoint")
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def first_conv(encoder):
    """The names of the convolutions that take the image (a ResNet's conv1; a timm model's first_conv)."""
    if not hasattr(encoder, "pretrained_cfg"):
        return ["conv1"]
    names = encoder.pretrained_cfg.get("first_conv") or ()
    return [names] if isinstance(names, str) else list(names)


def fold_to_rgb(state, convs):
    """A 1-channel first convolution as a 3-channel one, w / 3 on each channel: on a gray image repeated
    to 3 channels it sums to the same output (up to float rounding)."""
    state = dict(state)
    for name in convs:
        w = state.get(name + ".weight")
        if w is not None and w.ndim == 4 and w.shape[1] == 1:
            state[name + ".weight"] = (w / 3).repeat(1, 3, 1, 1)
    return state


def float32(state):
    """Every floating tensor as contiguous float32 on the CPU (safetensors stores each tensor once)."""
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
            for k, v in state.items()}


# ---------------------------------------------------------------- how to load it
def method_label(name):
    """"BYOL" for byol: the method's name in tables (common/methods.py), else the name as recorded."""
    from common import methods
    try:
        return methods.get(name).label
    except (KeyError, ValueError, OSError):
        return str(name or "self-supervised")


def settings(meta, epoch, in_chans, rgb):
    """The plain values the files record: what the encoder is, how it was trained, what it takes. The
    data are named by their MedMNIST flags; a path of the user's own images is not recorded."""
    flags = meta.get("args") or {}
    sources = [d for d in str(flags.get("data") or "").split(",") if d]
    named = list(dict.fromkeys(d if is_medmnist(d) else "own images" for d in sources))
    init = flags.get("init") or "random"
    return {"arch": meta["arch"], "stem": meta["stem"] if meta["arch"] in models.RESNETS else None,
            "in_chans": in_chans, "size": meta.get("size", flags.get("size")), "patch_size": meta.get("patch_size"),
            "pool": meta.get("pool"), "input_scaling": meta.get("input_scaling", models.INPUT_SCALING),
            "method": meta.get("method"), "epoch": epoch, "epochs": flags.get("epochs"),
            "data": ", ".join(named) or None, "folded_to_rgb": bool(rgb),
            "init": init if init in ("random", "imagenet", "barlowtwins") else "a weights file"}


def timm_kwargs(s):
    """timm.create_model's arguments, after the name, for this encoder, as Python source."""
    kwargs = f"num_classes=0, in_chans={s['in_chans']}"
    if s["patch_size"] is not None:
        kwargs += (f", img_size={s['size']}, patch_size={s['patch_size']}, "
                   f"global_pool={'token' if s['pool'] == 'cls' else 'avg'!r}, dynamic_img_size=True")
    return kwargs


def small_stem_line(s):
    """The line that gives a timm or torchvision ResNet MedSSL's small stem (a 3x3/1 conv, no max-pool)."""
    return (f"model.conv1, model.maxpool = torch.nn.Conv2d({s['in_chans']}, 64, 3, 1, 1, bias=False), "
            f"torch.nn.Identity()")


def loading_code(s, encoder_file, hf_dir):
    """{"timm": ..., "torchvision": ... (ResNets only), "hf": ...}: Python source that builds `model`, the
    exported encoder in eval mode, from encoder_file / the hf folder. The model card and the printed
    lines are these, and the tests run them."""
    small = s["stem"] == "small"
    code = {}
    if small:
        code["timm"] = (f"import timm, torch\n"
                        f"model = timm.create_model({s['arch']!r}, {timm_kwargs(s)})\n"
                        f"{small_stem_line(s)}\n"
                        f"timm.models.load_checkpoint(model, {encoder_file!r}); model.eval()")
    else:
        code["timm"] = (f"import timm\n"
                        f"model = timm.create_model({s['arch']!r}, {timm_kwargs(s)}, "
                        f"checkpoint_path={encoder_file!r}).eval()")
    if s["arch"] in models.RESNETS:
        extra = (small_stem_line(s) + "\n" if small else
                 f"model.conv1 = torch.nn.Conv2d({s['in_chans']}, 64, 7, 2, 3, bias=False)\n"
                 if s["in_chans"] != 3 else "")
        code["torchvision"] = (f"import torch, torchvision; from safetensors.torch import load_file\n"
                               f"model = torchvision.models.{s['arch']}(); model.fc = torch.nn.Identity()\n"
                               f"{extra}"
                               f"model.load_state_dict(load_file({encoder_file!r})); model.eval()")
    if small:
        code["hf"] = (f"import timm, torch; from safetensors.torch import load_file\n"
                      f"model = timm.create_model({'local-dir:' + hf_dir!r})\n"
                      f"{small_stem_line(s)}\n"
                      f"model.load_state_dict(load_file({os.path.join(hf_dir, 'model.safetensors')!r})); "
                      f"model.eval()")
    else:
        code["hf"] = (f"import timm\n"
                      f"model = timm.create_model({'local-dir:' + hf_dir!r}, pretrained=True).eval()")
    return code


# ---------------------------------------------------------------- the model card
def read_metrics(path):
    """(title, rows) of an evaluate.py metrics.json (or the run folder holding it): rows are (metric,
    [(seed, value)], mean, std), the per-seed test values, thresholds aside."""
    file = os.path.join(path, "metrics.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            result = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--metrics {escape(path)}: no such file" + (" (the folder holds no metrics.json: has its "
                        "evaluation finished?)" if os.path.isdir(path) else "") + "; pass an evaluate.py run "
                        "folder or its metrics.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--metrics {escape(file)} cannot be read as JSON ({type(e).__name__}); pass the "
                        f"metrics.json of an evaluate.py run") from None
    seeds = result.get("per_seed") if isinstance(result, dict) else None
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(r, dict) and isinstance(r.get("test"), dict) and "seed" in r for r in seeds):
        raise UserError(f"--metrics {escape(file)} is not an evaluate.py metrics.json (no per-seed test results); "
                        f"pass the metrics.json of an evaluate.py run")
    names = [k for k in dict.fromkeys(k for r in seeds for k in r["test"]) if "threshold" not in k]
    rows = []
    for name in names:
        values = [(r["seed"], r["test"][name]) for r in seeds if isinstance(r["test"].get(name), (int, float))]
        if not values:
            continue
        xs = [v for _, v in values]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        rows.append((name, values, mean, std))
    mode = result.get("mode", "evaluation")
    title = f"{escape(result.get('data', '?'))}, {escape(mode)}, {len(seeds)} seed{'s' * (len(seeds) > 1)}"
    return title, rows, result


def metrics_table(title, rows):
    seeds = list(dict.fromkeys(seed for _, values, _, _ in rows for seed, _ in values))
    lines = [f"**{title}** (test split; mean ± sample std over seeds)", "",
             "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 2) + "|"]
    for name, values, mean, std in rows:
        by_seed = dict(values)
        cells = [f"{by_seed[s]:.4f}" if s in by_seed else "" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.4f} ± {std:.4f} |")
    return "\n".join(lines)


def is_medmnist(source):
    """Whether a --data source is a MedMNIST flag (pathmnist ... organmnist3d), not a path: by its form,
    as importing medmnist's list loads scikit-learn (seconds)."""
    return bool(re.fullmatch(r"[a-z]+mnist(3d)?", source))


def hub_datasets(data):
    """The MedMNIST flags among settings' data: own images are not named."""
    return [d for d in str(data or "").split(", ") if is_medmnist(d)]


def model_card(s, code, tables, license, datasets, feature_dim):
    method = method_label(s["method"])
    tags = ["image-feature-extraction", "timm", "medssl", "self-supervised-learning", "medical-imaging",
            *([s["method"]] if s["method"] else [])]
    front = ["---", "library_name: timm", f"license: {license}", "tags:", *(f"- {t}" for t in tags)]
    if datasets:
        front += ["datasets:", *(f"- {d}" for d in datasets)]
    front += ["pipeline_tag: image-feature-extraction", "---", ""]
    arch = s["arch"] + (f" ({s['stem']} stem)" if s["stem"] else "") + (
        f", {s['patch_size']} px patches, {s['pool']} pooling" if s["patch_size"] else "")
    data = s["data"] or "unrecorded data"
    unfinished = isinstance(s["epochs"], int) and isinstance(s["epoch"], int) and s["epoch"] < s["epochs"]
    plural = "" if s["epoch"] == 1 else "s"
    epochs = (f"{s['epoch']} of {s['epochs']} epochs (an unfinished run)" if unfinished
              else f"{s['epoch']} epoch{plural}")
    start = {"random": "random initialisation", "imagenet": "ImageNet weights",
             "barlowtwins": "Barlow Twins' ImageNet weights"}.get(s["init"], s["init"])
    gray = ("The first convolution was trained on 1 channel and summed out to 3 (each weight / 3): feed gray "
            "images repeated to 3 channels. " if s["folded_to_rgb"] else "")
    body = [f"# {s['arch']}: {method} pretraining with MedSSL", "",
            f"An image encoder without a classifier: it returns {feature_dim}-dimensional features. "
            f"Pretrained with {method} (labels unused) for {epochs} on the train split of {data}, at "
            f"{s['size']} px with {s['in_chans']}-channel input.", "",
            f"- architecture: {arch}", f"- method: {method}", f"- data: {data}", f"- epochs: {epochs}",
            f"- started from: {start}",
            f"- input: {s['in_chans']} x {s['size']} x {s['size']}", "",
            "## Input scaling", "",
            f"{s['input_scaling']}. {gray}In timm's terms: mean 0.5 and std 0.5 per channel on [0, 1] pixels "
            f"(config.json), no crop.", "",
            "## Evaluation", ""]
    body += [t + "\n" for t in tables] if tables else ["No evaluation was attached to this export.", ""]
    body += ["## How to load", "", "With timm, from this folder or from the hub once uploaded "
             "(`hf-hub:<user>/<model>` in place of `local-dir:<folder>`):", "", "```python", code["hf"], "```", "",
             "Features: `model(x)` for x of shape (B, " + f"{s['in_chans']}, {s['size']}, {s['size']}), scaled "
             "as above.", ""]
    if s["stem"] == "small":
        body += ["timm's ResNet has no 3x3/1 stem without max-pool (MedSSL's `small` stem): the third line "
                 "puts it in before the weights load. From the hub, the weights' file is "
                 "`huggingface_hub.hf_hub_download(\"<user>/<model>\", \"model.safetensors\")`.", ""]
    body += ["## Upload", "", "```bash", "hf upload <user>/<model> <this folder> .", "```", ""]
    return "\n".join(front + body)


# ---------------------------------------------------------------- --out
def check_out(out):
    """Refuse an --out that holds anything export.py does not write (hidden entries aside)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {escape(out)} is a file, not a folder; choose another --out")
    if not os.path.isdir(out):
        return
    foreign = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith("."):
            continue
        if name == ENCODER_FILE and os.path.isfile(path) and not os.path.islink(path):
            continue
        if name == HF_DIR and os.path.isdir(path) and not os.path.islink(path):
            inner = [n for n in os.listdir(path) if not n.startswith(".") and (
                n not in HF_FILES or not os.path.isfile(os.path.join(path, n)))]
            foreign += [f"{HF_DIR}/{n}" for n in sorted(inner)]
            continue
        foreign.append(name + ("/" if os.path.isdir(path) else ""))
    if foreign:
        shown = ", ".join(escape(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {escape(out)} holds files export.py did not write ({shown}); choose an empty or "
                        f"new folder for --out")


def write_safetensors(path, tensors, metadata):
    from safetensors.torch import save
    rundir._atomic_replace(path, lambda f: f.write(save(tensors, metadata=metadata)))


def write_hf(folder, model, s, card):
    """timm's hub folder: save_for_hf into a temporary folder beside it, then each file moved in whole."""
    import timm
    size, channels = s["size"], s["in_chans"]
    data_config = {"input_size": (channels, size, size), "mean": (0.5,) * channels, "std": (0.5,) * channels,
                   "crop_pct": 1.0, "interpolation": "bilinear"}
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-export-")
    try:
        timm.models.save_for_hf(model, tmp, model_config={
            "pretrained_cfg": {"tag": f"medssl_{s['method']}", "license": s["license"]},
            "medssl": {k: v for k, v in s.items() if k != "license"}},
            safe_serialization=True, data_config=data_config)
        config = os.path.join(tmp, "config.json")
        with open(config) as f:
            cfg = json.load(f)
        for key in SOURCE_KEYS:  # the ImageNet weights' provenance, which these weights do not share
            cfg["pretrained_cfg"].pop(key, None)
        with open(config, "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        for name in HF_FILES:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except OSError as e:
        raise rundir._os_error(e, f"cannot write {escape(folder)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    args = cli.parse_args(get_args_parser())
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "export")

    # ---- the checkpoint's encoder, checked against the architecture it names; the model card's results
    meta, epoch, state = read_encoder(args.ckpt)
    check_out(out)
    tables = []
    for path in args.metrics:
        title, rows, result = read_metrics(path)
        tables.append(metrics_table(title, rows))
        evaluated = result.get("encoder")
        if isinstance(evaluated, str) and os.path.isfile(evaluated) and \
                not os.path.samefile(evaluated, args.ckpt):
            print(f"warning: --metrics {escape(path)} evaluated {escape(evaluated)}, not --ckpt {escape(args.ckpt)}")
    reference = load_strict(build(meta, meta["in_chans"]), state, args.ckpt)

    # ---- the exported weights: float32, optionally folded to 3 channels, checked by loading them strictly
    rgb = args.rgb and meta["in_chans"] == 1
    if args.rgb and not rgb:
        print(f"note: --rgb: the encoder already takes {meta['in_chans']} channels; exported as it is")
    in_chans = 3 if rgb else meta["in_chans"]
    tensors = float32(fold_to_rgb(reference.state_dict(), first_conv(reference)) if rgb else reference.state_dict())
    s = {**settings(meta, epoch, in_chans, rgb), "license": args.license}
    if meta["arch"] in models.RESNETS:  # timm's ResNet has torchvision's keys; the small stem is put in
        import timm
        model = timm.create_model(meta["arch"], num_classes=0, in_chans=in_chans)
        if meta["stem"] == "small":
            model.conv1, model.maxpool = torch.nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    else:
        model = build(meta, in_chans)
    load_strict(model, tensors, args.ckpt)

    # ---- write: encoder.safetensors, then the hub folder
    os.makedirs(out, exist_ok=True)
    encoder_file = os.path.join(out, ENCODER_FILE)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in s.items() if k != "license"}
    write_safetensors(encoder_file, tensors, {"format": "pt", "library": "medssl", **metadata})
    hf_dir = os.path.join(out, HF_DIR)
    card_code = loading_code(s, ENCODER_FILE, "<folder>")
    datasets = args.dataset if args.dataset is not None else hub_datasets(s["data"])
    write_hf(hf_dir, model, s, model_card(s, card_code, tables, args.license, datasets, models.feature_dim(model)))

    size = os.path.getsize(encoder_file)
    print(f"{encoder_file}: {size / 2 ** 20:.1f} MB ({size / os.path.getsize(args.ckpt):.0%} of the checkpoint), "
          f"{s['arch']} {in_chans}-channel encoder of {s['method']}, {epoch} epochs")
    print(f"{hf_dir}: config.json, model.safetensors, README.md")
    for library, code in loading_code(s, encoder_file, hf_dir).items():
        print(f"\nload with {library}:\n{code}")
    print(f"\nupload: hf upload <user>/<model> {hf_dir} .")


if __name__ == "__main__":
    cli.run_main(main)
