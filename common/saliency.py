"""Where a classifier looks: Grad-CAM and occlusion-sensitivity maps, and a grid that overlays the maps
of several models on the same images (paper 002 compares a Barlow-Twins-pretrained ResNet-18 with a
randomly initialised one this way).

The attributions come from Captum (Meta's PyTorch interpretability library): its only dependencies
(torch, numpy, matplotlib, packaging, tqdm) are already ours. pytorch-grad-cam (PyPI `grad-cam`) was
the other candidate, but it pulls in opencv-python-headless (~50 MB) and ttach, and resizes each map
on the CPU with OpenCV, for what is a few tensor operations here.

Every map is (N, H, W) at the input's resolution, in [0, 1], scaled per image by its maximum: 0
means "no evidence for the class" and stays 0 (a min-max stretch would turn the least negative
pixel of an empty map into apparent evidence)."""
import contextlib

import numpy as np
import torch

from common import figures  # also sets matplotlib's headless backend before pyplot loads
import matplotlib.pyplot as plt  # noqa: E402


def _targets(model, images, class_idx):
    """class_idx: an int, one index per image, or None for each image's predicted class."""
    if class_idx is None:
        with torch.no_grad():
            return model(images).argmax(dim=1)
    if isinstance(class_idx, int):
        return class_idx
    return torch.as_tensor(class_idx, device=images.device).long().reshape(-1)


def _scaled(maps):
    """(N, H, W) attributions -> positive part divided by each image's maximum."""
    maps = maps.detach().float().clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
    return maps / peak[:, None, None]


@contextlib.contextmanager
def _eval_mode(model):
    """Maps are read from the model as it predicts: in eval mode (BatchNorm running statistics, no
    dropout). Each module's own mode is restored afterwards, not one flag for all, so that frozen
    BatchNorm layers a fine-tuning loop keeps in eval mode stay so."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def gradcam(model, target_layer, images, class_idx=None):
    """Grad-CAM (Selvaraju et al. 2017): the target layer's activations weighted by the spatially
    averaged gradient of the class logit, summed over channels, ReLU, upsampled (bilinear) to the
    input size. images: the model's float input (N, C, H, W); target_layer: a module of `model`,
    e.g. `encoder.layer4` of a ResNet (deepest_spatial_stage picks one whose map is not too coarse).
    Returns (N, H, W) in [0, 1]."""
    from captum.attr import LayerAttribution, LayerGradCam  # optional: only --saliency needs it
    with _eval_mode(model):
        target = _targets(model, images, class_idx)
        cam = LayerGradCam(model, target_layer).attribute(images, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return _scaled(cam[:, 0])


def deepest_spatial_stage(encoder, images, min_side=4):
    """Name of the deepest ResNet stage (layer4 ... layer1) whose feature map on these inputs is at
    least min_side wide: the Grad-CAM layer. Grad-CAM can only place evidence as finely as that map,
    and at 28 px through the ImageNet stem layer4 is 1 x 1 (layer2 is 4 x 4); with the small stem,
    or at 224 px, layer4 qualifies (4 x 4, 7 x 7)."""
    names, sides = ("layer4", "layer3", "layer2", "layer1"), {}

    def record(name):
        def hook(module, inputs, output):  # returns None: a forward hook's return value replaces the output
            sides[name] = output.shape[-1]
        return hook
    hooks = [getattr(encoder, n).register_forward_hook(record(n)) for n in names]
    try:
        with _eval_mode(encoder), torch.no_grad():
            encoder(images[:1])
    finally:
        for h in hooks:
            h.remove()
    return next((n for n in names if sides[n] >= min_side), "layer1")


def occlusion_sensitivity(model, images, class_idx=None, patch=4, stride=2, baseline=0.0, per_forward=16):
    """Occlusion sensitivity (Zeiler & Fergus 2014): slide a `patch` x `patch` square of value
    `baseline` over the image with `stride`, and record how much the class logit drops; a pixel
    gets the mean drop of the patches covering it. Only drops count (a patch that raises the score
    is not evidence). baseline 0.0 is mid-grey for inputs normalised as common.data.to_input does.
    per_forward: occluded copies of the batch per forward pass (Captum's default, 1, leaves a GPU
    idle on small images). Returns (N, H, W) in [0, 1]."""
    from captum.attr import Occlusion  # optional: only --saliency needs it
    channels = images.shape[1]
    with _eval_mode(model), torch.no_grad():
        target = _targets(model, images, class_idx)
        drop = Occlusion(model).attribute(images, target=target, baselines=baseline,
                                          sliding_window_shapes=(channels, patch, patch),
                                          strides=(channels, stride, stride), perturbations_per_eval=per_forward)
    return _scaled(drop.mean(dim=1))  # the window spans all channels: one value per pixel


def _display(image):
    """(C, H, W) or (H, W[, C]) image of any range -> (H, W) or (H, W, 3) floats in [0, 1]."""
    img = np.asarray(image.detach().cpu() if torch.is_tensor(image) else image, dtype=float)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # channels first -> last
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else np.zeros_like(img)


def plot_overlay_grid(images, maps, path, title="", alpha=0.5, row_labels=None, predicted=None):
    """Write a grid (PDF and 300 dpi PNG, figures.save): a row per image; columns: the input, then
    each model's map laid over it (jet colour map, `alpha` opaque), with one colorbar for the map scale. images: N images (any
    layout _display takes); maps: an ordered dict {column label: (N, H, W) array in [0, 1]}, e.g.
    {"Barlow Twins": a, "random init": b}. row_labels: N strings under each input, e.g. the true
    class; predicted: {column label: N strings}, e.g. each model's predicted class, shown under
    that model's map."""
    n = len(images)
    for label, m in maps.items():
        if len(m) != n or tuple(np.shape(m)[-2:]) != _display(images[0]).shape[:2]:
            raise ValueError(f"maps of {label!r} are {tuple(np.shape(m))}; expected ({n}, H, W) like the images")
    for what, given in (("row_labels", row_labels), *((f"predicted[{k!r}]", v) for k, v in (predicted or {}).items())):
        if given is not None and len(given) != n:
            raise ValueError(f"{what} has {len(given)} entries for {n} images")
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols + 0.6, 2.0 * n + 0.5), dpi=100, squeeze=False)
    shown_map = None
    for i in range(n):
        shown = _display(images[i])
        gray = "gray" if shown.ndim == 2 else None
        axes[i, 0].imshow(shown, cmap=gray)
        if row_labels is not None:
            axes[i, 0].set_xlabel(f"true: {row_labels[i]}", fontsize=7)
        for j, (label, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(shown, cmap=gray)
            m = m[i].detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m[i])
            shown_map = axes[i, j].imshow(m, cmap="jet", alpha=alpha, vmin=0, vmax=1)
            if predicted and label in predicted:
                axes[i, j].set_xlabel(f"predicted: {predicted[label][i]}", fontsize=7)
    for j, label in enumerate(["input", *maps]):
        axes[0, j].set_title(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(figures.wrap(title, int(22 * cols)), fontsize=9)
    # keep the top 0.45 inch for the title: tight_layout alone lets it sit on the column headings
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 if title else 0) / fig.get_figheight()))
    if shown_map is not None:
        bar = fig.colorbar(shown_map, ax=axes[:, 1:].ravel().tolist(), fraction=0.04, pad=0.03)
        bar.set_label("evidence for the class (1 = strongest in the image)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    return figures.save(fig, path, title)  # a PDF beside a 300 dpi PNG
