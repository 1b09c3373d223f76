"""Embed a dataset: the encoder's features of every image, one row per image with its split, index, file
and label, and a 2-D map of them coloured by class (docs/OUTPUTS.md).

The encoder comes from a pretraining checkpoint (--ckpt) or a baseline init (--init random|imagenet|
<.pth>), as evaluate.py takes them. Its features are what evaluate.py's linear probe and kNN see: the
pooled output in eval mode (BatchNorm's running statistics) of the images scaled as in pretraining
(uint8 / 255, then (x - 0.5) / 0.5; gray repeated to 3 channels for a 3-channel encoder), in data order.

    python embed.py --ckpt runs/x/checkpoint.pt --data breastmnist --out runs/embed-breast
    python embed.py --ckpt runs/x/checkpoint.pt --data path/to/folder --split test --format parquet
    python embed.py --init imagenet --arch resnet50 --size 224 --data pneumoniamnist --no-map
"""
import argparse
import os

from common import cli

SPLITS = {"all": ("train", "val", "test"), "train": ("train",), "val": ("val",), "test": ("test",)}
MAP_METHODS = ("auto", "umap", "tsne")


def get_args_parser():
    parser = argparse.ArgumentParser("embed", description=__doc__)
    cli.add_common_flags(parser, data_help="the images to embed: a MedMNIST 2D flag, an .npz, a folder, a CSV "
                                           "manifest or DICOM files (see docs/DATA.md)")
    flags = {a.dest: a for a in parser._actions}
    flags["size"].default = None
    flags["size"].help += ("; default: the size the --ckpt encoder was pretrained at, else 28 (a different size is "
                           "used as asked, with a warning)")
    flags["seed"].help = "seed of a random init's weights and of the map's sample and layout"
    flags["max_steps"].help = argparse.SUPPRESS  # nothing is trained

    # * Encoder
    g = parser.add_argument_group("encoder")
    g.add_argument("--ckpt", default=None, help="checkpoint.pt of a pretrain_<method>.py run (its --arch, --stem, "
                   "--in-chans, --patch-size and --pool come with it)")
    g.add_argument("--init", default=None, help="baseline encoder without --ckpt: random | imagenet | <.pth> "
                   "(a torchvision ResNet's or, with a timm --arch, a timm-layout .pth / .safetensors) (default "
                   "random)")
    g.add_argument("--resize", type=int, default=None,
                   help="upsample the --size images to this side on the device (nearest), as evaluate.py --resize "
                        "(default off)")

    # * What to embed
    g = parser.add_argument_group("images")
    g.add_argument("--split", default="all", choices=list(SPLITS),
                   help="the split to embed; all = train, val and test, in that order")
    g.add_argument("--batch-size", type=int, default=512, help="images per forward pass (eval mode: the features "
                   "do not depend on it beyond float rounding)")

    # * Outputs
    g = parser.add_argument_group("outputs")
    g.add_argument("--format", default="csv", choices=["csv", "parquet"],
                   help="the table beside embeddings.npz: embeddings.csv, or embeddings.parquet (needs pyarrow)")
    g.add_argument("--no-map", action="store_true", help="skip the 2-D map (map.png, map.pdf, map.npz)")
    g.add_argument("--map-method", default="auto", choices=list(MAP_METHODS),
                   help="the map's projection: umap (needs umap-learn), tsne (scikit-learn's t-SNE), auto = umap "
                        "when umap-learn imports, else tsne")
    g.add_argument("--map-max-points", type=int, default=5000, metavar="N",
                   help="map at most N images, a sample drawn with --seed when there are more (the figure says "
                        "so); every row is in the table either way")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import numpy as np

from common import data, errors, methods, models, precision, rundir
from common.errors import UserError


def resolve_args(args):
    """The encoder's settings from --ckpt (as evaluate.py takes them) or the flags, and the checks that
    need no data."""
    if args.ckpt and args.init:
        raise UserError("give --ckpt or --init, not both")
    if "," in args.data:
        raise UserError("embed.py takes one --data source; run it once per source")
    if args.max_steps is not None:
        raise UserError("--max-steps caps training steps; embed.py trains nothing: drop it")
    for flag, value in (("--batch-size", args.batch_size), ("--map-max-points", args.map_max_points),
                        ("--resize", args.resize)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.format == "parquet":
        errors.require("pyarrow.parquet", "--format parquet")
    if args.map_method == "umap" and not args.no_map:
        errors.require("umap", "--map-method umap")
    args.out = args.out or cli.default_out("embed", args.data)
    vars(args).update(models.resolve_encoder(args.ckpt, args.init, args.arch, args.stem, args.in_chans,
                                             args.patch_size, args.pool, args.size, args.resize, doing="embedding"))
    return args


def encoder_words(args):
    """The encoder in a few words, for the map's title: never a path."""
    if args.ckpt:
        meta, epoch = models.checkpoint_meta(args.ckpt)
        try:
            method = methods.get(str(meta.get("method"))).label
        except KeyError:
            method = "pretrained"
        return f"{method} {args.arch}" + (f", epoch {epoch}" if isinstance(epoch, int) else "")
    if args.init in ("random", "imagenet"):
        return f"{'random-init' if args.init == 'random' else 'ImageNet'} {args.arch}"
    return f"{args.arch} ({os.path.basename(args.init)})"


def load_rows(args, info, split, device, options):
    """(images, labels or None, files or None) of one split: labels None for unlabeled images (a
    folder or CSV without classes: their one split is train)."""
    if not info.labeled:
        images = data.load_pretrain_images(args.data, args.size, args.data_root, device, args.in_chans, options)
        return images, None, data.split_files(info, split)
    s = data.load_split(args.data, split, args.size, args.data_root, device, args.in_chans, options=options)
    return s.images, s.labels.cpu().numpy().astype(np.int64), data.split_files(info, split)


def write_npz(f, arrays):
    """np.savez's layout (one .npy per array in a zip), which np.load reads, for names that np.savez's own
    arguments take (its first is called `file`)."""
    import zipfile
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, value in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def table_columns(table, class_names):
    """The columns of embeddings.csv / .parquet, before the features: split, index, file, then the label
    (index and class name) or, multi-label, one 0/1 column per label, none when unlabeled."""
    cols = {"split": table["split"], "index": table["index"], "file": table["file"]}
    labels = table.get("labels")
    if labels is None:
        return cols
    if labels.ndim == 2:
        cols.update({f"label_{name}": labels[:, j] for j, name in enumerate(class_names)})
    else:
        cols["label"] = labels
        cols["class"] = np.asarray(class_names, dtype=str)[labels] if class_names else labels.astype(str)
    return cols


def write_csv(path, cols, features, chunk=1024):
    """The table as CSV (RFC 4180 quoting), the features with 9 significant digits: float32 read back
    exactly. Rows are formatted a chunk at a time, so that a large set is never held as Python floats."""
    def cell(value):
        text = str(value)
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text
    numbers = ",".join(["%.9g"] * features.shape[1])

    def write(f):
        f.write((",".join(map(cell, [*cols, *(f"f{j}" for j in range(features.shape[1]))])) + "\n").encode())
        for start in range(0, len(features), chunk):
            lines = [",".join([*(cell(c[start + i]) for c in cols.values()), numbers % tuple(row)])
                     for i, row in enumerate(features[start:start + chunk].tolist())]
            f.write(("\n".join(lines) + "\n").encode())
    rundir._atomic_replace(path, write)


def write_parquet(path, cols, features):
    """The table as Parquet: the CSV's columns, the features as float32 columns f0 .. f<D-1>."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = {k: pa.array(np.asarray(v).tolist()) for k, v in cols.items()}
    columns.update({f"f{j}": pa.array(features[:, j]) for j in range(features.shape[1])})
    rundir._atomic_replace(path, lambda f: pq.write_table(pa.table(columns), f))


# ---------------------------------------------------------------- the map
def map_method(requested):
    """umap or tsne: `auto` is umap where umap-learn imports."""
    if requested != "auto":
        return requested
    try:
        import umap  # noqa: F401
        return "umap"
    except ImportError:
        print("note: the map is a t-SNE (scikit-learn): pip install umap-learn for a UMAP", flush=True)
        return "tsne"


def project_2d(features, method, seed):
    """(M, 2) coordinates of the rows of `features`: UMAP (McInnes et al. 2018) with its defaults, or
    t-SNE on the first 50 principal components, as scikit-learn advises for wide features."""
    n = len(features)
    if method == "umap":
        import umap
        # seeded, hence one thread (umap-learn runs a random_state on one thread anyway, with a warning)
        reducer = umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
        return reducer.fit_transform(features).astype(np.float32)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    x = features.astype(np.float64)
    if x.shape[1] > 50 and n > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (n - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x).astype(np.float32)


def plot_map(out, xy, labels, class_names, method, title, note):
    """map.png (300 dpi) and map.pdf: the points coloured by class (multi-label: by their first positive
    label), a legend of the class names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name = {"umap": "UMAP", "tsne": "t-SNE"}[method]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    size = max(1.0, min(12.0, 3000 / len(xy)))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="tab:blue", linewidths=0)
    else:
        groups = labels.argmax(axis=1) if labels.ndim == 2 else labels
        groups = np.where(labels.max(axis=1) > 0, groups, -1) if labels.ndim == 2 else groups
        cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
        for c in sorted(set(groups.tolist())):
            at = groups == c
            label = "none positive" if c < 0 else str(class_names[c]) if c < len(class_names) else str(c)
            ax.scatter(xy[at, 0], xy[at, 1], s=size, color="lightgray" if c < 0 else cmap(c % cmap.N),
                       label=f"{label} ({int(at.sum())})", linewidths=0)
        legend_title = "first positive label" if labels.ndim == 2 else "class"
        ax.legend(title=legend_title, markerscale=max(1.0, 6 / size), fontsize=8, title_fontsize=8, frameon=False,
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name} of {title}\n{note}", fontsize=10)
    fig.tight_layout()
    words = f"{name} of {title}; {note}"  # also in the files' metadata; no date, so a rerun gives the same PDF
    for ext, kwargs in (("png", {"dpi": 300, "metadata": {"Title": words}}),
                        ("pdf", {"metadata": {"Title": words, "CreationDate": None}})):
        rundir._atomic_replace(os.path.join(out, f"map.{ext}"),
                               lambda f: fig.savefig(f, format=ext, bbox_inches="tight", **kwargs))
    plt.close(fig)


def write_map(args, info, features, labels):
    """map.npz (coordinates and the rows they belong to), map.png and map.pdf, of a sample drawn with --seed
    when there are more rows than --map-max-points."""
    if len(features) < 5:
        print(f"note: no map: {len(features)} images are too few for a 2-D projection", flush=True)
        return
    method = map_method(args.map_method)
    rows = np.arange(len(features))
    if len(rows) > args.map_max_points:
        rows = np.sort(np.random.default_rng(args.seed).choice(len(rows), args.map_max_points, replace=False))
    xy = project_2d(features[rows], method, args.seed)
    rundir._atomic_replace(os.path.join(args.out, "map.npz"),
                           lambda f: np.savez(f, xy=xy, row=rows, method=np.asarray(method)))
    name = os.path.basename(args.data.rstrip("/\\")) or args.data
    what = "all splits" if args.split == "all" and info.labeled else f"{SPLITS[args.split][0]} split"
    note = f"{name}, {what}, " + (f"{len(rows):,} images" if len(rows) == len(features) else
                                   f"a random sample of {len(rows):,} of {len(features):,} images (seed {args.seed})")
    plot_map(args.out, xy, None if labels is None else labels[rows], info.class_names, method,
             f"{encoder_words(args)} features", note)


def main():
    args = resolve_args(cli.parse_args(get_args_parser()))
    device = cli.pick_device(args.device)

    # ---- data: what the source is (a folder or CSV is converted once, into its cache)
    options = data.options_from(vars(args))
    info = data.describe(args.data, args.size, args.data_root, options)
    splits = SPLITS[args.split]
    if not info.labeled and args.split not in ("all", "train"):
        raise UserError(f"{args.data} holds unlabeled images, all in the train split; use --split train or all")
    splits = splits if info.labeled else ("train",)

    # ---- encoder, loaded before the run directory (a bad --init changes nothing there); a random init
    # is the one evaluate.py's seed --seed draws
    cli.seed_everything(args.seed)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.encoder_size,
                                  patch_size=args.patch_size, pool=args.pool)
    side = args.resize or args.size  # what the encoder sees
    arithmetic = precision.resolve(args.precision, device, side, convolutional=not models.vit_arch(args.arch))
    print(f"precision: {arithmetic.describe()} (--precision {args.precision})", flush=True)
    arithmetic.prepare(encoder, device, args.in_chans, side)
    epoch = models.checkpoint_meta(args.ckpt)[1] if args.ckpt else None

    # ---- run directory
    inputs = rundir.provenance({args.data: info.hash}, encoder=args.init, epoch=epoch)
    rundir.prepare_run_dir(args.out, vars(args), done_file="embeddings.npz", inputs=inputs)

    # ---- features, split by split (one split's images in memory at a time), in data order
    feats, labels, split_col, index, files = [], [], [], [], []
    for split in splits:
        images, y, names = load_rows(args, info, split, device, options)
        feats.append(models.features(encoder, images, args.in_chans, batch_size=args.batch_size, resize=args.resize,
                                     precision=arithmetic).cpu().numpy())
        n = len(images)
        del images
        if names is not None and len(names) != n:
            raise UserError(f"the cache of {args.data} lists {len(names)} files for {n} {split} images; delete "
                            f"the cache folder's files of it and run again")
        labels.append(y)
        split_col += [split] * n
        index.append(np.arange(n, dtype=np.int64))
        files += names if names is not None else [""] * n
        print(f"{split}: {n} images -> {feats[-1].shape[1]} features", flush=True)
    features = np.concatenate(feats).astype(np.float32)
    table = {"split": np.asarray(split_col, dtype=str), "index": np.concatenate(index),
             "file": np.asarray(files, dtype=str), "labels": None if labels[0] is None else np.concatenate(labels)}

    # ---- the table (csv or parquet), the map, and embeddings.npz last: once it is there the run is whole
    (write_parquet if args.format == "parquet" else write_csv)(
        os.path.join(args.out, f"embeddings.{args.format}"), table_columns(table, info.class_names), features)
    if not args.no_map:
        write_map(args, info, features, table["labels"])
    arrays = {"features": features, **{k: v for k, v in table.items() if v is not None},
              "class_names": np.asarray(info.class_names, dtype=str), "task": np.asarray(info.task),
              "data": np.asarray(args.data), "encoder": np.asarray(str(args.init)),
              "input_scaling": np.asarray(models.INPUT_SCALING), "precision": np.asarray(arithmetic.name)}
    rundir._atomic_replace(os.path.join(args.out, "embeddings.npz"), lambda f: write_npz(f, arrays))
    print(f"wrote {len(features)} rows x {features.shape[1]} features to {errors.escape(args.out)}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
