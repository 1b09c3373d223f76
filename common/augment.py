"""Batched image augmentations for self-supervised pretraining on MedMNIST.

Every op works on a whole batch x of shape (B, C, H, W), C in {1, 3}, float32 or
bf16 with values in [0, 1], on x's own device (CPU or CUDA), and returns a tensor
of the same shape, dtype and device, clamped to [0, 1].

EVERY IMAGE DRAWS ITS OWN RANDOM PARAMETERS. The authors' code of the papers we
reproduce applied one crop to a whole batch; that is the bug this module must not
repeat. Ops are vectorised torch code (grid_sample, grouped conv, broadcast masks);
there are no per-image Python loops and no PIL. Where torchvision has the op (random
resized crop, colour jitter, grayscale, Gaussian blur, hue), it computes what
torchvision.transforms.v2 computes for the same parameters, and draws them as
torchvision does, per image (tests/test_augment.py checks both).

All randomness comes from the explicit torch.Generator `g` (on x's device), never
from the global RNG, so runs are reproducible and resumable.

Contract: fn(x, g, **params) -> tensor. An op with a probability `p` applies to each
image independently with probability p (a per-image Bernoulli mask). An op may
return x itself when it changes nothing (e.g. p=0), so never modify outputs in place.

Gray images (C=1): saturation, hue and grayscale are no-ops ("adapted to gray images").

No op reads a device value back to the host (no .item(), no Python `if` on a tensor, no checked
linear solve) and constants are built once per device and dtype, so a CUDA step never waits here.

Every script's --aug goes through views(spec): a preset name (NAMES) or a paper 002 menu string.
"""
import functools
import inspect
import math

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights as torchvision's rgb_to_grayscale rounds them for tensors (0.2989 for red;
# PIL uses 0.299): its adjust_contrast / adjust_saturation and RandomGrayscale use these.
_LUMA = (0.2989, 0.587, 0.114)
# Corners of an image in grid_sample's normalised coordinates (perspective).
_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))
# HSV -> RGB: (hue + offset) mod 6 - 3 is the signed distance, in sextants, from the hue to the one
# where channel R, G, B is the smallest (cyan 3, magenta 5, yellow 1).
_HSV_OFFSETS = (0.0, 4.0, 2.0)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _const(values, device, dtype):
    """A constant tensor, built once per (values, device, dtype): torch.tensor(...) on a CUDA device
    copies from the host and waits for it, in every call. Shared: never modify it in place."""
    return torch.tensor(values, dtype=dtype, device=device)


def _rand(x, g, *shape):
    """Uniform [0, 1) float32 numbers on x's device, drawn from g."""
    return torch.rand(shape, generator=g, device=x.device)


def _lerp(u, lo, hi):
    """Map uniform [0, 1) numbers u onto [lo, hi)."""
    return lo + (hi - lo) * u


def _factor(u, strength):
    """Factor uniform in [max(0, 1 - s), 1 + s], centred on 1 (torchvision's ColorJitter range)."""
    return _lerp(u, max(0.0, 1.0 - strength), 1.0 + strength)


def _per_image(v, x):
    """Reshape a (B,) vector to (B, 1, 1, 1) in x's dtype, to broadcast over an image batch."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _where_p(x, g, p, y):
    """Take y for each image with probability p (independently), x otherwise."""
    if p >= 1:
        return y
    keep_y = _rand(x, g, x.shape[0]) < p
    return torch.where(keep_y.view(-1, 1, 1, 1), y, x)


def _luma(x):
    """(B, 1, H, W) ITU-R 601 luma of an RGB batch."""
    r, gr, b = _LUMA
    return r * x[:, 0:1] + gr * x[:, 1:2] + b * x[:, 2:3]


def _gray_mean(x):
    """(B,) mean of each image's grayscale version (the image itself when C=1)."""
    m = x.mean(dim=(2, 3))                        # (B, C), cheap: no luma image is built
    if x.shape[1] == 3:
        return m @ _const(_LUMA, m.device, m.dtype)
    return m[:, 0]


def _scale_brightness(x, f):
    """adjust_brightness, f a (B,) factor vector: x * f."""
    return (x * _per_image(f, x)).clamp_(0, 1)


def _scale_contrast(x, f):
    """adjust_contrast: x * f + m * (1 - f), m the mean of each image's grayscale version (torchvision's
    _blend)."""
    f = _per_image(f, x)
    return (x * f).add_(_per_image(_gray_mean(x), x) * (1 - f)).clamp_(0, 1)


def _shift_hue(x, turns):
    """Shift the hue of each RGB image by `turns` (B,) of a full turn, exactly as torchvision's
    adjust_hue (RGB -> HSV, hue + turns mod 1, HSV -> RGB), for the whole batch at once.

    Value v (the largest channel) and chroma c (largest - smallest) are kept; the hue is handled in
    sextants h in [0, 6). Computed in float32 whatever x's dtype: bf16 would misplace hues. The
    in-place steps work on fresh tensors only; on the CPU they spare a page-faulting allocation each.
    """
    y = x.float()
    r, g, b = y.unbind(1)                                       # (B, H, W) each
    v = y.amax(1)
    c = y.amin(1).neg_().add_(v)
    # Which channel is largest picks the sextant formula; red wins ties, then green (as torchvision).
    # Gray pixels (c = 0) get h = 0 / tiny = 0 and keep their value whatever the shift.
    h = (r - g).add_(c, alpha=4)
    h = torch.where(v == g, (b - r).add_(c, alpha=2), h, out=h)
    h = torch.where(v == r, g - b, h, out=h)
    h.div_(c.clamp(min=1e-30)).add_(6 * turns.float().view(-1, 1, 1) + 6)   # shifted, and > 0
    # HSV -> RGB: channel = v - c * clamp(2 - d, 0, 1), d the circular distance from h to the hue
    # where the channel is the smallest: v - c within 1 sextant of it, v beyond 2, linear between.
    d = (h[:, None] + _const(_HSV_OFFSETS, y.device, y.dtype).view(1, 3, 1, 1)).remainder_(6).sub_(3).abs_()
    f = d.neg_().add_(2).clamp_(0, 1)
    out = torch.addcmul(v[:, None], f, c[:, None], value=-1, out=f)
    return out.clamp_(0, 1).to(x.dtype)


# ----------------------------------------------------------------------------
# ops: fn(x, g, **params) -> tensor
# ----------------------------------------------------------------------------

def _crop_boxes(n, height, width, g, scale, ratio, device):
    """crop_boxes as (left, top) and (w, h), (n, 2) each (x before y, as grid_sample): one tensor
    op for both sides wherever it can, a kernel launch fewer each on a GPU."""
    u = torch.rand((n, 10, 2), generator=g, device=device)           # 10 candidates: area, log aspect
    lo = _const((scale[0] * height * width, math.log(ratio[0])), device, torch.float32)
    span = _const(((scale[1] - scale[0]) * height * width, math.log(ratio[1]) - math.log(ratio[0])), device,
                  torch.float32)
    area, log_aspect = torch.addcmul(lo, u, span).unbind(-1)
    aspect = log_aspect.exp()
    wh = torch.stack([area * aspect, area / aspect], dim=-1).sqrt_().round_()   # half to even, as round()
    size = _const((float(width), float(height)), device, torch.float32)
    fits = ((wh >= 1) & (wh <= size)).all(dim=-1)                    # (n, 10)
    first = fits.int().argmax(dim=1, keepdim=True)                   # argmax: the first of equal maxima
    found = fits.any(dim=1, keepdim=True)
    wh = wh.gather(1, first[..., None].expand(n, 1, 2)).squeeze(1)
    # torchvision's fallback: the central crop, its aspect clamped to `ratio` (the image's shape alone)
    if width / height < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    wh = torch.where(found, wh, _const((float(fw), float(fh)), device, torch.float32))
    # randint(0, side - box + 1): the floor of a uniform [0, side - box + 1), capped against rounding
    room = size - wh
    lt = torch.minimum((torch.rand((n, 2), generator=g, device=device) * (room + 1)).floor_(), room)
    lt = torch.where(found, lt, _const((float((width - fw) // 2), float((height - fh) // 2)), device, torch.float32))
    return lt, wh


def crop_boxes(n, height, width, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device="cpu"):
    """n boxes drawn as torchvision's RandomResizedCrop.get_params draws one, all at once: up to 10
    candidates of area ~ U(scale) x height x width and log aspect w/h ~ U(log ratio), sides rounded
    to whole pixels; the first candidate that fits the image is kept, placed at a uniform integer
    offset; if none fits, the central crop with the aspect clamped to `ratio`. Every box has its own
    draws, all from g. Returns (top, left, h, w), float32 tensors of whole numbers, shape (n,)."""
    (left, top), (w, h) = (t.unbind(1) for t in _crop_boxes(n, height, width, g, scale, ratio, device))
    return top, left, h, w


def _grid_coords(side, start, length, in_side=None):
    """grid_sample coordinates (normalised, align_corners=False) of the pixels F.interpolate(mode=
    "bilinear", align_corners=False) reads when it resizes `length` pixels from `start` to `side`
    (start, length: (B, k); out: (B, k, side)) in an image `in_side` px across (default `side`): the
    centre of output pixel i maps to (i + 0.5) x length / side - 0.5, clamped to the box's first and
    last pixel (interpolate never reads past the crop; grid_sample's border padding alone would),
    then p -> (2p + 1) / in_side - 1."""
    in_side = side if in_side is None else in_side
    i = _const(tuple(j + 0.5 for j in range(side)), start.device, torch.float32)
    src = ((length / side)[..., None] * i).sub_(0.5).clamp_(min=0)
    src = torch.minimum(src, (length - 1)[..., None]).add_(start[..., None])
    return src.mul_(2 / in_side).add_(1 / in_side - 1)


def _resized_crop(x, lt, wh, size=None):
    """resized_crop with boxes as _crop_boxes gives them."""
    B, C, H, W = x.shape
    out_h, out_w = (H, W) if size is None else (size, size)
    if H == W and out_h == out_w:
        gx, gy = _grid_coords(out_w, lt, wh, W).unbind(1)
    else:
        gx = _grid_coords(out_w, lt[:, :1], wh[:, :1], W)[:, 0]
        gy = _grid_coords(out_h, lt[:, 1:], wh[:, 1:], H)[:, 0]
    grid = torch.stack([gx[:, None, :].expand(B, out_h, out_w), gy[:, :, None].expand(B, out_h, out_w)], dim=-1)
    # float32 coordinates and samples: a bf16 grid would misplace them by up to a third of a pixel
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)


def resized_crop(x, top, left, height, width, size=None):
    """Crop box b (top, left, height, width: (B,) whole numbers) from image b and resize it to the
    image's own size, bilinear: torchvision.transforms.v2.functional.resized_crop for every image at
    once. Boxes never exceed the image, so every resize is an enlargement (or none), where
    antialias=True (torchvision's default) and antialias=False give the same result. `size`: resize
    to size x size px instead (multi-crop's local views), where a box larger than that is shrunk as
    antialias=False shrinks it (bilinear, no low-pass filter first)."""
    return _resized_crop(x, torch.stack([left, top], dim=1), torch.stack([width, height], dim=1), size)


# Defaults: torchvision's RandomResizedCrop, as used by BYOL (Grill et al. 2020, Table 6).
def random_resized_crop(x, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), size=None):
    """torchvision's RandomResizedCrop (bilinear) with every image's own box: crop_boxes, then
    resized_crop back to the image's size, or to size x size px (resized_crop)."""
    B, C, H, W = x.shape
    return _resized_crop(x, *_crop_boxes(B, H, W, g, scale, ratio, x.device), size)


# Default p=0.5: BYOL (Grill et al. 2020, Table 6) and torchvision.
def horizontal_flip(x, g, p=0.5):
    """Mirror each image left-right with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, x.flip(-1))


# torchvision's fn_idx numbering of the colour-jitter ops.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def jitter(x, order, brightness=None, contrast=None, saturation=None, hue=None):
    """torchvision's ColorJitter with given parameters, for every image at once: image b gets
    adjust_brightness, adjust_contrast, adjust_saturation and adjust_hue (as torchvision.transforms.v2
    .functional) in the order of row b of `order` ((B, 4), a permutation of BRIGHTNESS, CONTRAST,
    SATURATION, HUE each), with its own factors ((B,) tensors; hue in turns; None = that op off).
    Saturation and hue are no-ops on gray images (C == 1), as in torchvision."""
    return _jitter(x, order.argsort(dim=1), brightness, contrast, saturation, hue)


def _jitter(x, keys, brightness, contrast, saturation, hue):
    """jitter with the order given as keys: image b runs its ops in increasing keys[b, op].

    Brightness, contrast and saturation are the same blend (torchvision's _blend), x * f + ref * (1 - f)
    with ref = 0, the image's gray mean or its per-pixel gray, so one stage runs whichever of them
    each image has at that place in its order. The hue shift, the expensive op, runs once, between a
    pass of the stages each image has before it and a pass of those after it; in each pass an image
    skips the stages of the other with f = 1, which gives it back exactly."""
    rgb = x.shape[1] == 3
    given = {BRIGHTNESS: brightness, CONTRAST: contrast, SATURATION: saturation if rgb else None}
    cheap = tuple(op for op, f in given.items() if f is not None)
    hue = hue if rgb else None
    if not cheap:
        return x if hue is None else _shift_hue(x, hue)
    B, C = x.shape[:2]
    sorted_keys, which = keys.index_select(1, _const(cheap, x.device, torch.long)).sort(dim=1)
    f = torch.stack([given[op] for op in cheap], dim=1).gather(1, which)     # (B, n): stage s's factor

    def blend_stages(y, runs):
        fs = f if runs is None else torch.where(runs, f, 1.0)
        w = 1 - fs
        # contrast: ref = the gray mean, an offset per image; saturation: ref = the per-pixel gray, so
        # f x I + (1 - f) x (a row of luma weights) is a 3x3 matrix on the channels
        contrast_w = (w * (which == cheap.index(CONTRAST))).unbind(1) if CONTRAST in cheap else None
        if SATURATION in cheap:
            eye = _const(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), y.device, torch.float32)
            saturation_w = w * (which == cheap.index(SATURATION))
            mix = torch.addcmul(fs[..., None, None] * eye, saturation_w[..., None, None],
                                _const(_LUMA, y.device, torch.float32)).to(y.dtype).unbind(1)
        else:
            fs_by_stage = fs.to(y.dtype).unbind(1)
        for s in range(len(cheap)):
            offset = (contrast_w[s] * _gray_mean(y)).to(y.dtype) if contrast_w else None
            if SATURATION in cheap:
                flat = y.reshape(B, C, -1)
                y = (torch.bmm(mix[s], flat) if offset is None else
                     torch.baddbmm(offset.view(B, 1, 1), mix[s], flat)).view(y.shape)
            elif offset is None:
                y = y * fs_by_stage[s].view(B, 1, 1, 1)
            else:
                y = torch.addcmul(offset.view(B, 1, 1, 1), y, fs_by_stage[s].view(B, 1, 1, 1))
            y = y.clamp_(0, 1)
        return y

    if hue is None:
        return blend_stages(x, None)
    before = sorted_keys < keys[:, HUE:HUE + 1]                  # (B, n): stage s comes before the hue shift
    return blend_stages(_shift_hue(blend_stages(x, before), hue), ~before)


# Defaults: BYOL (Grill et al. 2020, Table 6): brightness 0.4, contrast 0.4,
# saturation 0.2, hue 0.1, applied with p=0.8.
def color_jitter(x, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8):
    """torchvision's ColorJitter, as a whole with probability p, each image with its own factors
    and its own random order of the four ops (torchvision draws a new order per call, i.e. per
    image)."""
    if p <= 0:
        return x
    B = x.shape[0]
    u = _rand(x, g, B, 4).unbind(1)
    keys = _rand(x, g, B, 4)                          # i.i.d. keys: their order is a uniform permutation
    y = _jitter(x, keys,
                brightness=_factor(u[0], brightness) if brightness else None,
                contrast=_factor(u[1], contrast) if contrast else None,
                saturation=_factor(u[2], saturation) if saturation else None,
                hue=_lerp(u[3], -hue, hue) if hue else None)
    return _where_p(x, g, p, y)


# Default p=0.2: BYOL (Grill et al. 2020, Table 6).
def grayscale(x, g, p=0.2):
    """Replace each RGB image by its ITU-R 601 luma (kept at C channels) with probability p."""
    if p <= 0 or x.shape[1] == 1:                  # adapted to gray images: no-op when C == 1
        return x
    return _where_p(x, g, p, _luma(x).repeat(1, x.shape[1], 1, 1))


# A blur whose sigma range is given for a reference side (BYOL, SimCLR, Barlow Twins: 0.1-2.0 px at
# 224 px) is scaled to the image, so that it covers the same fraction of it. Where even the largest
# scaled sigma is under a third of a pixel, the kernel leaves each neighbouring pixel under 1.2% of
# its weight (exp(-4.5)) and the blur is off: the op returns its input, and size_note says so. BYOL's
# range is off below 38 px: at 28 px it would reach 0.25 px, and change real MedMNIST images by
# 0.007 grey levels on average even at that sigma (at most 0.1); at 64 px it reaches 0.57 px.
MIN_BLUR_SIGMA_PX = 1 / 3


def blur_is_off(side, sigma=(0.1, 2.0), sigma_relative_to=224):
    """Whether gaussian_blur with this sigma range is off at images `side` px high (see above)."""
    return bool(sigma_relative_to) and sigma[1] * side / sigma_relative_to < MIN_BLUR_SIGMA_PX


def blur(x, sigma, kernel_size):
    """torchvision.transforms.v2.functional.gaussian_blur (reflect padding, odd square kernel) with
    sigma[b] px for image b, as two 1-D passes of the same kernel: all B x C channels in one grouped
    convolution per direction."""
    B, C, H, W = x.shape
    r = kernel_size // 2
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype)        # (B, k)
    kernel = kernel.repeat_interleave(C, dim=0)                         # (B*C, k), one per channel
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), kernel.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), kernel.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W).clamp_(0, 1)


# Defaults: BYOL (Grill et al. 2020, Table 6): sigma ~ U(0.1, 2.0) at 224 px with
# a 23 px kernel (10% of the side), p=1.0 for view 1 and 0.1 for view 2.
def gaussian_blur(x, g, p=1.0, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224):
    """Gaussian blur with a per-image sigma ~ U(sigma), reflect padding, with probability p. The
    sigma range is for images of side `sigma_relative_to` (224 px in BYOL) and is scaled by
    H / sigma_relative_to, kept >= 0.1 px; sigma_relative_to=None: sigma is in pixels. Off (x
    itself) where blur_is_off."""
    B, C, H, W = x.shape
    if p <= 0 or blur_is_off(H, sigma, sigma_relative_to):
        return x
    s = _lerp(_rand(x, g, B), *sigma)
    if sigma_relative_to:
        s = (s * (H / sigma_relative_to)).clamp(min=0.1)
    k = max(3, round(kernel_frac * H))
    k += 1 - k % 2                                 # odd: 22.4 -> 23 at 224 px, 7 at 64 px, 3 at 28 px
    return _where_p(x, g, p, blur(x, s, k))


# Defaults: BYOL (Grill et al. 2020, Table 6): p=0.0 for view 1, 0.2 for view 2;
# threshold 0.5 on [0, 1] images.
def solarize(x, g, p=0.2, threshold=0.5):
    """Invert the pixels >= threshold (x -> 1 - x) of each image with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, torch.where(x >= threshold, 1 - x, x))


# Defaults: torchvision's RandomErasing (Random Erasing, Zhong et al. 2020); cutout
# is one of the extra augmentations Van der Sluijs et al. 2023 found useful for
# chest X-rays, added in paper 001's "BYOL+".
def cutout(x, g, p=0.5, scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0):
    """Set one random rectangle per image (area fraction ~ U(scale), log-uniform aspect h/w) to `value`, with probability p."""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    u = _rand(x, g, B, 5)                          # area, log-ratio, top, left, apply
    area = _lerp(u[:, 0], *scale) * (H * W)
    r = _lerp(u[:, 1], math.log(ratio[0]), math.log(ratio[1])).exp()
    # Whole-pixel sides of at least 1 px, clipped to the image.
    h = (area * r).sqrt().round().clamp(1, H)
    w = (area / r).sqrt().round().clamp(1, W)
    top = (u[:, 2] * (H - h + 1)).floor()
    left = (u[:, 3] * (W - w + 1)).floor()
    rows = torch.arange(H, device=x.device, dtype=torch.float32)
    cols = torch.arange(W, device=x.device, dtype=torch.float32)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])     # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])   # (B, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :] & (u[:, 4] < p)[:, None, None]
    return x.masked_fill(hole[:, None], value)     # (B, 1, H, W) mask broadcast over channels


# Defaults: strength 0.4, p=0.8 as BYOL's colour jitter (Grill et al. 2020, Table 6);
# a stand-alone op for paper 001's "BYOL+" (after Van der Sluijs et al. 2023).
def brightness(x, g, p=0.8, strength=0.4):
    """Multiply each image by a factor ~ U[1 - s, 1 + s], with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, _scale_brightness(x, _factor(_rand(x, g, x.shape[0]), strength)))


# Defaults: strength 0.4, p=0.8 as BYOL's colour jitter (Grill et al. 2020, Table 6);
# a stand-alone op for paper 001's "BYOL+" (after Van der Sluijs et al. 2023).
# The factor is drawn AROUND 1: one paper's code only ever lowered contrast.
def contrast(x, g, p=0.8, strength=0.4):
    """Scale each image's deviation from its own mean by a factor ~ U[1 - s, 1 + s], with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, _scale_contrast(x, _factor(_rand(x, g, x.shape[0]), strength)))


def apply_steps(x, steps, g):
    """Run the (function, kwargs) steps on x in order, all drawing from generator g."""
    for fn, kwargs in steps:
        x = fn(x, g, **kwargs)
    return x


def two_views(images_uint8, preset, g):
    """uint8 (B, C, H, W) images -> two float32 views in [0, 1]; preset is what views() returns, or
    an --aug string given to views()."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected uint8 (B, C, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    steps1, steps2 = views(preset) if isinstance(preset, str) else preset
    x = images_uint8.to(torch.float32).div_(255)  # converted once, shared by both views
    return apply_steps(x, steps1, g), apply_steps(x, steps2, g)


# ----------------------------------------------------------------------------
# ops of paper 002's augmentation menu
# ----------------------------------------------------------------------------
# Paper 002's code (PolLM/Self-supervised-learning-for-medical-imaging, transform
# scans) applies each extra transform with p=0.5 ("transforms_prob"), except the
# rotation, after the base random-resized-crop + horizontal flip; its values are
# the defaults below.

# Default p=0.5: paper 002 (RandomVerticalFlip(p=0.5)).
def vertical_flip(x, g, p=0.5):
    """Mirror each image top-bottom with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, x.flip(-2))


def _equalize_all(x):
    """Histogram-equalise every channel of every image at once on 256 grey levels, with the rule
    of PIL's ImageOps.equalize (which torchvision's equalize follows on uint8 images): the step
    is (pixel count - count of the highest level present) // 255, level v maps to
    (pixels below v + step // 2) // step, and a channel whose step is 0 is left as it is."""
    B, C, H, W = x.shape
    levels = (x.float() * 255).round_().long().view(B * C, H * W)        # (BC, HW) in 0..255
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))                 # one histogram per row
    top = hist.gather(1, levels.max(dim=1, keepdim=True).values)          # count of the highest level
    step = torch.div(H * W - top, 255, rounding_mode="floor")             # (BC, 1)
    below = hist.cumsum(1) - hist                                         # pixels strictly below v
    lut = torch.div(below + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    out = lut.gather(1, levels).to(torch.float32) / 255
    out = torch.where(step > 0, out, x.float().reshape(B * C, H * W))
    return out.view(B, C, H, W).to(x.dtype)


# Default p=0.5: paper 002 (RandomEqualize(p=0.5)).
def equalize(x, g, p=0.5):
    """Histogram-equalise each image (per channel, 256 levels, as torchvision/PIL) with probability p."""
    if p <= 0:
        return x
    return _where_p(x, g, p, _equalize_all(x))


def _homographies(src, dst):
    """(B, 3, 3) projective maps taking the four points src[b] to dst[b] ((B, 4, 2) each): the
    8x8 linear system of the direct linear transform, solved for all images in one call."""
    B = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -x * u, -y * u], dim=-1)   # (B, 4, 8)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -x * v, -y * v], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)                                          # (B, 8, 8)
    b = torch.cat([u, v], dim=1)                                                    # (B, 8)
    h, _ = torch.linalg.solve_ex(a, b, check_errors=False)   # solve's error check would wait for the device
    return torch.cat([h, torch.ones(B, 1, dtype=h.dtype, device=h.device)], dim=1).view(B, 3, 3)


# Defaults: paper 002's code, torchvision's RandomPerspective(distortion_scale=0.15, p=0.5).
def perspective(x, g, p=0.5, distortion=0.15):
    """Move each corner of each image inwards by its own random amount (each coordinate by up to
    `distortion` x half the side, as torchvision's RandomPerspective) and warp the image onto that
    quadrilateral; what falls outside the image is 0 (torchvision's fill), with probability p."""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    # Normalised coordinates (grid_sample, align_corners=False): the image spans [-1, 1] and half
    # the side is 1, so the inward shift of a corner coordinate is U(0, distortion).
    corners = _const(_CORNERS, x.device, torch.float64).expand(B, 4, 2)
    shift = _rand(x, g, B, 4, 2).double() * distortion
    moved = corners - corners * shift                       # each coordinate towards the centre
    # The output shows the image squeezed into `moved`; grid_sample needs the opposite map, from
    # each output pixel back to where it comes from: the homography taking moved -> corners.
    hom = _homographies(moved, corners)
    ys = (torch.arange(H, dtype=torch.float64, device=x.device) + 0.5) / H * 2 - 1   # pixel centres
    xs = (torch.arange(W, dtype=torch.float64, device=x.device) + 0.5) / W * 2 - 1
    pts = torch.stack([xs.expand(H, W), ys[:, None].expand(H, W), torch.ones(H, W, dtype=torch.float64,
                                                                             device=x.device)], dim=-1)
    src = pts.view(1, H * W, 3) @ hom.transpose(1, 2)                                # (B, HW, 3)
    grid = (src[..., :2] / src[..., 2:]).view(B, H, W, 2).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _where_p(x, g, p, out.clamp_(0, 1))


# Defaults: paper 002's code, torchvision's RandomRotation(20): an angle ~ U(-20, 20) degrees
# for every image (no p there, hence p=1), fill 0.
def rotation(x, g, p=1.0, degrees=20.0):
    """Rotate each image about its centre by its own angle ~ U(-degrees, degrees) (or U(lo, hi) for
    a pair), counter-clockwise for positive angles as torchvision; corners fill with 0; with probability p."""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    lo, hi = (-degrees, degrees) if isinstance(degrees, (int, float)) else degrees
    angle = _lerp(_rand(x, g, B), lo, hi) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    # affine_grid works in normalised coordinates, where one unit is W/2 px along x and H/2 px
    # along y: a rotation in pixels needs the aspect ratio on the off-diagonal terms.
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * (H / W)
    theta[:, 1, 0], theta[:, 1, 1] = sin * (W / H), cos
    grid = F.affine_grid(theta.to(x.dtype), (B, C, H, W), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _where_p(x, g, p, out.clamp_(0, 1))


# Defaults: paper 002's code: noise std = the image's mean x U(0.06, 0.1), p=0.5 (after
# Sriram et al. 2021, who write it as mean / SNR with SNR ~ U(4, 8), i.e. a factor U(0.125, 0.25)).
def gaussian_noise(x, g, p=0.5, relative_sigma=(0.06, 0.1)):
    """Add zero-mean Gaussian noise whose std is the image's own mean times a factor ~ U(relative_sigma),
    drawn per image, then clamp to [0, 1]; with probability p."""
    if p <= 0:
        return x
    B = x.shape[0]
    sigma = _lerp(_rand(x, g, B), *relative_sigma) * x.float().mean(dim=(1, 2, 3))
    noise = torch.randn(x.shape, generator=g, device=x.device) * sigma.view(-1, 1, 1, 1)
    return _where_p(x, g, p, (x + noise.to(x.dtype)).clamp_(0, 1))


# ----------------------------------------------------------------------------
# views: a step is (function, kwargs); a view is a list of steps; a preset is a pair of views
# ----------------------------------------------------------------------------

# Paper 002's menu, in the order the steps run whatever order they are named in (the order of
# paper 002's code: crop, flips, equalize, blur, perspective, rotation, then the tensor ops).
# Both views draw from the same menu (paper 002's Transform(transform, transform)).
MENU = {
    # torchvision's RandomResizedCrop defaults (scale 0.08-1) and a horizontal flip p=0.5
    "base": [(random_resized_crop, dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))),
             (horizontal_flip, dict(p=0.5))],
    "vflip": [(vertical_flip, dict(p=0.5))],
    "equalize": [(equalize, dict(p=0.5))],
    # sigma U(0.1, 2.0) px at 224 px (Barlow Twins' PIL blur, kept in paper 002), scaled to the
    # image side like the BYOL preset's blur; p=0.5
    "blur": [(gaussian_blur, dict(p=0.5, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224))],
    "perspective": [(perspective, dict(p=0.5, distortion=0.15))],
    # p=1, unlike the other items: paper 002 gives no probability for its rotation, and its code,
    # which produced the rotation rows of both transformation scans, calls RandomRotation(20)
    # outside its p=0.5 wrapping, so every image rotates (the p=0.5 it quotes is that of the
    # papers it took the menu from).
    "rotation": [(rotation, dict(p=1.0, degrees=20.0))],
    # paper 002 tried brightness and contrast modulation (after Azizi et al. 2021, +-0.2) and
    # dropped them; here both are factors around 1 (its contrast only ever lowered contrast)
    "brightness": [(brightness, dict(p=0.5, strength=0.2))],
    "contrast": [(contrast, dict(p=0.5, strength=0.2))],
    "noise": [(gaussian_noise, dict(p=0.5, relative_sigma=(0.06, 0.1)))],
}
# Paper 002's final set (slide "Final set of transformations").
PAPER002_MENU = "base+vflip+equalize+perspective+blur+noise"


def menu(spec):
    """Steps of a paper 002 menu string such as "base+vflip+equalize+perspective+blur+noise",
    in MENU's order; unknown or repeated names raise ValueError."""
    names = [n.strip() for n in str(spec).split("+")]
    if not spec.strip():
        raise ValueError(f"empty augmentation: name a preset ({', '.join(NAMES)}) or join any of "
                         f"{', '.join(MENU)} with '+'")
    unknown = [n for n in names if n not in MENU]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} in {spec!r}: name a preset "
                         f"({', '.join(NAMES)}) or join any of {', '.join(MENU)} with '+'")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation named twice in {spec!r}")
    return [step for name in MENU if name in names for step in MENU[name]]


def _byol_view(blur_p, solarize_p):
    """One BYOL view (Grill et al. 2020, Table 6); the two views differ only in blur and solarize."""
    return [
        (random_resized_crop, dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))),
        (horizontal_flip, dict(p=0.5)),
        (color_jitter, dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)),
        (grayscale, dict(p=0.2)),
        (gaussian_blur, dict(p=blur_p, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224)),
        (solarize, dict(p=solarize_p, threshold=0.5)),
    ]


# Paper 001 (Murphy, BYOL on MedMNIST) used lucidrains/byol-pytorch's default
# augmentation, in this order, the same for both views.
_PAPER001 = [
    (color_jitter, dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=0.3)),
    (grayscale, dict(p=0.2)),
    (horizontal_flip, dict(p=0.5)),
    # fixed 3x3 kernel (kernel_frac=0 -> the 3 px minimum), sigma 1.0-2.0 in pixels
    (gaussian_blur, dict(p=0.2, sigma=(1.0, 2.0), kernel_frac=0.0, sigma_relative_to=None)),
    (random_resized_crop, dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))),
]

# Paper 001 §4.2 / §5.1 "BYOL+": paper 001's augmentation plus cutout, contrast
# and brightness, after Van der Sluijs et al. 2023.
_BYOL_PLUS = _PAPER001 + [
    (cutout, dict(p=0.5, scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0)),
    (contrast, dict(p=0.8, strength=0.4)),
    (brightness, dict(p=0.8, strength=0.4)),
]


def _simclr_view(strength=1.0):
    """SimCLR's view (Chen et al. 2020, App. A), the same for both views: crop, flip, colour
    distortion of strength s (jitter 0.8s/0.8s/0.8s/0.2s with p=0.8, then grayscale p=0.2) and a
    blur with p=0.5. s=1.0 is its ImageNet setting (App. A; 0.5 for CIFAR-10, App. B.9). The
    blur (10% kernel, sigma U(0.1, 2.0) at 224 px) is scaled to the image side like BYOL's."""
    return [
        (random_resized_crop, dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))),
        (horizontal_flip, dict(p=0.5)),
        (color_jitter, dict(brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength,
                            hue=0.2 * strength, p=0.8)),
        (grayscale, dict(p=0.2)),
        (gaussian_blur, dict(p=0.5, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224)),
    ]


def _moco_v2_view():
    """MoCo v2's view (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
    Learning": SimCLR's augmentations with a weaker jitter), the same for both views: crop of 20-100%
    of the area, colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, blur p=0.5 (scaled to the
    side like BYOL's), flip."""
    return [
        (random_resized_crop, dict(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))),
        (color_jitter, dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)),
        (grayscale, dict(p=0.2)),
        (gaussian_blur, dict(p=0.5, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224)),
        (horizontal_flip, dict(p=0.5)),
    ]


def _paper003_view(blur_p, solarize_p):
    """One view of paper 003's further pretraining (App. A.2, Table 12): Barlow Twins' asymmetric
    pair (Zbontar et al. 2021, the same as BYOL's) with a crop of 70-100% of the area and a random
    rotation. Its rotation range did not survive in our copy of the paper: +-10 degrees with
    p=0.75 are fastai's defaults (max_rotate, p_affine), the library its code used. Solarize keeps
    Barlow Twins' threshold 0.5; paper 003's kornia solarize also drew the threshold from
    0.5 +- 0.1 and added a random offset."""
    return [
        (random_resized_crop, dict(scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3))),
        (horizontal_flip, dict(p=0.5)),
        (rotation, dict(p=0.75, degrees=10.0)),
        (color_jitter, dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)),
        (grayscale, dict(p=0.2)),
        (gaussian_blur, dict(p=blur_p, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224)),
        (solarize, dict(p=solarize_p, threshold=0.5)),
    ]


_PAPER002 = menu(PAPER002_MENU)
# Every preset, for every method: name -> (view 1 steps, view 2 steps).
PRESETS = {
    "byol": (_byol_view(blur_p=1.0, solarize_p=0.0), _byol_view(blur_p=0.1, solarize_p=0.2)),
    "paper001": (_PAPER001, _PAPER001),
    "byol+": (_BYOL_PLUS, _BYOL_PLUS),
    "simclr": (_simclr_view(), _simclr_view()),
    "moco_v2": (_moco_v2_view(), _moco_v2_view()),
    "paper002": (_PAPER002, _PAPER002),
    "paper003": (_paper003_view(blur_p=1.0, solarize_p=0.0), _paper003_view(blur_p=0.1, solarize_p=0.2)),
}
# The preset names --aug takes (besides menu strings), for help texts and error messages.
NAMES = tuple(PRESETS)

# Fine-tuning augmentation and test-time augmentation of paper 003 (App. A.1: each image randomly
# cropped, rotated and flipped; TTA averages 3 passes with the same augmentations). Its values did
# not survive in our copy: a 75-100% crop, fastai's +-10 degrees at p=0.75, a horizontal flip.
FINETUNE_AUG = {
    "none": [],
    "paper003": [
        (random_resized_crop, dict(scale=(0.75, 1.0), ratio=(3 / 4, 4 / 3))),
        (rotation, dict(p=0.75, degrees=10.0)),
        (horizontal_flip, dict(p=0.5)),
    ],
}


def views(spec, crop_scale=None):
    """The (view 1 steps, view 2 steps) pair of an --aug value, for any method: a preset name
    (NAMES) or a paper 002 menu string (both views draw from it). crop_scale=(min, max) replaces
    every random-resized-crop's area range: at 28 px the usual 0.08 lower bound is an 8x8 px patch
    blown up to the whole image. Bad values raise ValueError naming the valid ones."""
    if not isinstance(spec, str):
        raise ValueError(f"an augmentation must be a string, got {spec!r}: name a preset ({', '.join(NAMES)}) "
                         f"or join any of {', '.join(MENU)} with '+'")
    if spec in PRESETS:
        pair = PRESETS[spec]
    else:
        steps = menu(spec)
        pair = (steps, steps)
    if crop_scale is None:
        return pair
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale (MIN, MAX) must satisfy 0 < MIN <= MAX <= 1, got {lo:g} {hi:g}")
    return tuple([(fn, {**kw, "scale": (lo, hi)}) if fn is random_resized_crop else (fn, kw)
                  for fn, kw in steps] for steps in pair)


def size_note(pair, side):
    """One line saying that the Gaussian blur of these views (what views() returns) is off at
    images `side` px high (blur_is_off), or None when nothing is off."""
    defaults = inspect.signature(gaussian_blur).parameters
    for steps in pair:
        for fn, kw in steps:
            if fn is gaussian_blur:
                sigma = kw.get("sigma", defaults["sigma"].default)
                ref = kw.get("sigma_relative_to", defaults["sigma_relative_to"].default)
                if blur_is_off(side, sigma, ref):
                    on_from = math.ceil(MIN_BLUR_SIGMA_PX * ref / sigma[1])
                    on_from += blur_is_off(on_from, sigma, ref)            # float rounding at the edge
                    return (f"the Gaussian blur is off at {side} px (sigma {sigma[0]:g}-{sigma[1]:g} px at {ref} px "
                            f"scales to at most {sigma[1] * side / ref:.2f} px, under the 1/3 px minimum); "
                            f"it blurs from {on_from} px up")
    return None


def checked_spec(text):
    """argparse type of --aug: the spec itself, refused at parse time (a config value too) unless views()
    takes it."""
    import argparse
    try:
        views(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


# ----------------------------------------------------------------------------
# multi-crop: two global views and several small local views of every image
# ----------------------------------------------------------------------------

# DINO's crops (Caron et al. 2021 §3.1 and its code's defaults): global views of 40-100% of the
# area at 224 px, local views of 5-40% at 96 px, i.e. at 96/224 of the global side
GLOBAL_CROP_SCALE = (0.4, 1.0)
LOCAL_CROP_SCALE = (0.05, 0.4)
LOCAL_SIDE_FRACTION = 96 / 224


def local_side(side, multiple=2):
    """The side of the local views for global views `side` px across: DINO's 96 px at 224 scaled
    (12 px at 28, 28 px at 64), rounded to a multiple of `multiple` (a ViT's patch size; else 2), at
    least one of it."""
    return max(multiple, multiple * round(side * LOCAL_SIDE_FRACTION / multiple))


def local_view(steps, side, image_side, scale=LOCAL_CROP_SCALE, blur_p=0.5):
    """The steps of a local view, made from those of a global view (`steps`, of images `image_side` px
    across): its random resized crop takes `scale` of the area and resizes it to side x side px; its
    Gaussian blur applies with probability blur_p (DINO: 0.5, between its global views' 1.0 and 0.1)
    and keeps its sigma in the global view's pixels (DINO blurs its 96 px local crops with the same
    0.1-2 px as its 224 px global ones). Steps without a random resized crop raise ValueError."""
    if not any(fn is random_resized_crop for fn, _ in steps):
        raise ValueError("the views have no random resized crop, which local views are cut with; add one "
                         "(a preset, or 'base' in a menu)")
    local = []
    for fn, kw in steps:
        if fn is random_resized_crop:
            kw = {**kw, "scale": tuple(scale), "size": side}
        elif fn is gaussian_blur:
            ref = kw.get("sigma_relative_to", inspect.signature(gaussian_blur).parameters["sigma_relative_to"].default)
            kw = {**kw, "p": blur_p, "sigma_relative_to": ref * side / image_side if ref else ref}
        local.append((fn, kw))
    return local


def multi_crop(images_uint8, pair, local_steps, n_local, g):
    """uint8 (B, C, H, W) images -> the multi-crop views of DINO (Caron et al. 2021 §3.1, after SwAV's):
    the two global views of `pair` (what views() returns; two_views) and n_local local views made by
    `local_steps` (local_view's), each a float32 (B, C, h, w) batch in [0, 1], all drawn from g in that
    order: ([global 1, global 2], [local 1, ..., local n_local])."""
    first, second = two_views(images_uint8, pair, g)
    x = images_uint8.to(torch.float32).div_(255)
    return [first, second], [apply_steps(x, local_steps, g) for _ in range(n_local)]
