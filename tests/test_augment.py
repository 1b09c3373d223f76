"""Tests for common/augment.py: contract, per-image randomness, reproducibility, correctness."""
import itertools

import pytest
import torch

from common import augment as A

B = 16                      # batch size for the contract tests (>= 16 as required)
H = W = 28                  # MedMNIST's native size
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# op name -> (function, kwargs that make identical inputs give different outputs, has p).
# Continuous-parameter ops run with p=1; ops whose only randomness is the per-image
# Bernoulli mask (flip, grayscale, solarize) run with p=0.5. The blur uses sigma in
# pixels: scaled to 28 px (the default) it is off (sigma <= 0.25 px, under MIN_BLUR_SIGMA_PX).
OPS = {
    "random_resized_crop": (A.random_resized_crop, {}, False),
    "horizontal_flip": (A.horizontal_flip, {"p": 0.5}, True),
    "color_jitter": (A.color_jitter, {"p": 1.0}, True),
    "grayscale": (A.grayscale, {"p": 0.5}, True),
    "gaussian_blur": (A.gaussian_blur, {"p": 1.0, "sigma_relative_to": None}, True),
    "solarize": (A.solarize, {"p": 0.5}, True),
    "cutout": (A.cutout, {"p": 1.0}, True),
    "brightness": (A.brightness, {"p": 1.0}, True),
    "contrast": (A.contrast, {"p": 1.0}, True),
}
MASK_ONLY = {"horizontal_flip", "grayscale", "solarize"}   # randomness = the p mask alone


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def make_image(C):
    """A non-trivial image: a diagonal gradient (coloured when C=3) plus a bright square, no zeros."""
    i = torch.linspace(0, 1, H)[:, None]
    j = torch.linspace(0, 1, W)[None, :]
    base = 0.15 + 0.5 * (0.6 * i + 0.4 * j)                     # in [0.15, 0.65], crosses 0.5
    img = base.expand(C, H, W).clone()
    if C == 3:
        img = img * torch.tensor([1.0, 0.7, 0.4])[:, None, None] + torch.tensor([0.0, 0.1, 0.3])[:, None, None]
    img[:, 8:15, 10:20] = 0.95
    return img


def copies(C, n=B, device="cpu"):
    """A batch of n identical copies of make_image."""
    return make_image(C).expand(n, C, H, W).contiguous().to(device)


def n_distinct(batch):
    return torch.unique(batch.flatten(1), dim=0).shape[0]


# ----------------------------------------------------------------------------
# contract, parametrised over every op
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_contract(name, C, dtype, device):
    fn, kwargs, _ = OPS[name]
    x = torch.rand(B, C, H, W, generator=gen(1)).to(device=device, dtype=dtype)
    out = fn(x, gen(0, device), **kwargs)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_per_image_randomness(name, C):
    fn, kwargs, _ = OPS[name]
    x = copies(C)
    out = fn(x, gen(0), **kwargs)
    if name == "grayscale" and C == 1:               # adapted to gray images: a no-op
        assert torch.equal(out, x)
    elif name in MASK_ONLY:                          # applied to some images, not to others
        assert n_distinct(out) == 2
    else:                                            # each image draws its own parameters
        assert n_distinct(out) >= B // 2


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_reproducible(name, C):
    fn, kwargs, _ = OPS[name]
    x = copies(C)
    assert torch.equal(fn(x, gen(7), **kwargs), fn(x, gen(7), **kwargs))
    if not (name == "grayscale" and C == 1):         # the no-op cannot differ
        assert not torch.equal(fn(x, gen(7), **kwargs), fn(x, gen(8), **kwargs))


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(n for n in OPS if OPS[n][2]))
def test_op_p0_is_identity(name, C):
    fn, kwargs, _ = OPS[name]
    x = torch.rand(B, C, H, W, generator=gen(1))
    assert torch.equal(fn(x, gen(0), **{**kwargs, "p": 0.0}), x)


def test_ops_leave_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for C in (1, 3):
        for fn, kwargs, _ in OPS.values():
            fn(copies(C), gen(0), **kwargs)
        A.two_views((copies(C) * 255).to(torch.uint8), "byol", gen(0))
    assert torch.equal(torch.get_rng_state(), state)




# ----------------------------------------------------------------------------
# specific correctness checks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("C", [1, 3])
def test_horizontal_flip_p1_is_torch_flip(C):
    x = torch.rand(B, C, H, W, generator=gen(1))
    assert torch.equal(A.horizontal_flip(x, gen(0), p=1.0), torch.flip(x, dims=[-1]))


@pytest.mark.parametrize("C", [1, 3])
def test_solarize_p1_formula(C):
    x = torch.rand(B, C, H, W, generator=gen(1))
    expected = torch.where(x >= 0.3, 1 - x, x)
    assert torch.equal(A.solarize(x, gen(0), p=1.0, threshold=0.3), expected)


@pytest.mark.parametrize("C", [1, 3])
def test_random_resized_crop_full_square_is_identity(C):
    x = torch.rand(B, C, H, W, generator=gen(1))
    out = A.random_resized_crop(x, gen(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_random_resized_crop_zooms_in():
    # a crop of at most 10% of the area shows much less of a gradient than the whole image
    x = torch.linspace(0, 1, W).expand(B, 1, H, W).contiguous()     # left-right ramp
    span = lambda t: t.amax(dim=(1, 2, 3)) - t.amin(dim=(1, 2, 3))
    out = A.random_resized_crop(x, gen(0), scale=(0.05, 0.1))
    assert (span(out) < 0.6 * span(x)).all()


@pytest.mark.parametrize("op", [A.brightness, A.contrast])
def test_brightness_contrast_factor_centred_on_one(op):
    n = 4000
    if op is A.brightness:                            # constant 0.5 image: factor = out / 0.5
        x = torch.full((n, 1, 4, 4), 0.5)
        factor = op(x, gen(0), p=1.0, strength=0.4).mean(dim=(1, 2, 3)) / 0.5
    else:                                             # half 0.25, half 0.75: mean 0.5, deviation 0.25
        x = torch.full((n, 1, 4, 4), 0.25)
        x[..., 2:] = 0.75
        factor = (op(x, gen(0), p=1.0, strength=0.4)[..., 0, 2] - 0.5) / 0.25
    assert abs(factor.mean().item() - 1) < 0.05
    assert (factor > 1.05).any() and (factor < 0.95).any()
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5


def test_color_jitter_contrast_alone_is_centred_on_one():
    x = torch.full((4000, 1, 4, 4), 0.25)
    x[..., 2:] = 0.75
    out = A.color_jitter(x, gen(0), brightness=0, contrast=0.4, saturation=0, hue=0, p=1.0)
    factor = (out[..., 0, 2] - 0.5) / 0.25
    assert abs(factor.mean().item() - 1) < 0.05 and (factor > 1.05).any() and (factor < 0.95).any()


@pytest.mark.parametrize("C", [1, 3])
def test_gaussian_blur_smooths_noise_and_keeps_constants(C):
    noise = torch.rand(B, C, H, W, generator=gen(1))
    out = A.gaussian_blur(noise, gen(0), p=1.0, sigma=(1.0, 2.0), sigma_relative_to=None)
    assert (out.var(dim=(1, 2, 3)) < 0.7 * noise.var(dim=(1, 2, 3))).all()
    # default BYOL setting: off at 28 px (sigma scaled to at most 0.25 px), a blur at 64 px
    assert A.gaussian_blur(noise, gen(0)) is noise
    noise64 = torch.rand(B, C, 64, 64, generator=gen(1))
    out, before = A.gaussian_blur(noise64, gen(0)).var(dim=(1, 2, 3)), noise64.var(dim=(1, 2, 3))
    assert (out <= before).all() and (out < 0.7 * before).any()       # sigma 0.1-0.57 px: some blur little
    const = torch.rand(B, C, 1, 1, generator=gen(2)).expand(B, C, H, W).contiguous()
    out = A.gaussian_blur(const, gen(0), p=1.0, sigma=(1.0, 2.0), sigma_relative_to=None)
    torch.testing.assert_close(out, const, atol=1e-6, rtol=0)


def test_gaussian_blur_kernel_size_follows_image_size():
    # an impulse spreads over kernel_size pixels: 3 at 28 px, 23 at 224 px (BYOL's 23 px)
    for size, k in [(28, 3), (224, 23)]:
        x = torch.zeros(1, 1, size, size)
        x[0, 0, size // 2, size // 2] = 1.0
        out = A.gaussian_blur(x, gen(0), p=1.0, sigma=(50.0, 50.0), sigma_relative_to=None)
        assert (out[0, 0, size // 2] > 0).sum().item() == k


@pytest.mark.parametrize("C", [1, 3])
def test_cutout_erases_part_of_every_image(C):
    x = copies(C)                                     # no pixel is 0
    out = A.cutout(x, gen(0), p=1.0, value=0.0)
    changed = out != x
    assert changed.flatten(1).any(dim=1).all()        # something erased in every image
    assert (~changed).flatten(1).any(dim=1).all()     # something kept in every image
    assert (out[changed] == 0).all()                  # erased pixels hold the value
    assert (changed.all(dim=1) | ~changed.any(dim=1)).all()   # same hole on all channels
    area = changed[:, 0].flatten(1).float().mean(dim=1)
    assert area.min() > 0 and area.max() < 0.35


def test_grayscale_keeps_gray_rgb_image():
    # torchvision's weights sum to 0.9999 (0.2989 + 0.587 + 0.114): a gray image darkens by 1e-4 at most
    x = torch.rand(B, 1, H, W, generator=gen(1)).expand(B, 3, H, W).contiguous()
    torch.testing.assert_close(A.grayscale(x, gen(0), p=1.0), x, atol=1.01e-4, rtol=0)


def test_grayscale_p1_gives_equal_channels_as_torchvision_rgb_to_grayscale():
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(B, 3, H, W, generator=gen(1))
    out = A.grayscale(x, gen(0), p=1.0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)


def test_saturation_and_hue_leave_gray_images_alone():
    # adapted to gray images: no-ops when C=1; on a gray-valued RGB image they change nothing either
    kw = dict(brightness=0, contrast=0, saturation=0.8, hue=0.5, p=1.0)
    x1 = torch.rand(B, 1, H, W, generator=gen(1))
    assert torch.equal(A.color_jitter(x1, gen(0), **kw), x1)
    x3 = x1.expand(B, 3, H, W).contiguous()
    # hue keeps gray pixels; saturation blends with torchvision's gray, 0.9999 x the pixel (weights
    # 0.2989 + 0.587 + 0.114), and the largest factor 1.8 moves it by 0.8 x 1e-4 at most
    torch.testing.assert_close(A.color_jitter(x3, gen(0), **kw), x3, atol=8.1e-5, rtol=0)


def colour_batch(n=B, side=H):
    """RGB uint8 images with every hue and saturation: random pixels plus a gray and a saturated patch."""
    u8 = torch.randint(0, 256, (n, 3, side, side), generator=gen(3), dtype=torch.uint8)
    u8[:, :, :4, :4] = 90                                          # gray: hue undefined, kept
    u8[:, 0, 4:8, :4], u8[:, 1:, 4:8, :4] = 255, 0                 # pure red
    return u8


@pytest.mark.parametrize("turns", [0.1, -0.1, 0.2, 0.37, -0.5, 0.5])
def test_hue_shift_matches_torchvision_adjust_hue(turns):
    import torchvision.transforms.functional as TF
    u8 = colour_batch()
    x = u8.float() / 255
    # per-image factors: the given one, its negative, and values in between
    factors = torch.linspace(-turns, turns, B)
    out = A._shift_hue(x, factors)
    expected = torch.stack([TF.adjust_hue(img, f.item()) for img, f in zip(x, factors)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    expected_u8 = torch.stack([TF.adjust_hue(img, f.item()) for img, f in zip(u8, factors)])
    assert ((out * 255).round() - expected_u8.float()).abs().max() <= 1
    assert (out - x).abs().amax(dim=(1, 2, 3))[factors.abs() > 0.05].min() > 0.1     # colours moved


def test_hue_shift_in_bf16_follows_float32():
    x = colour_batch().float() / 255
    factors = torch.linspace(-0.1, 0.1, B)
    out = A._shift_hue(x.bfloat16(), factors)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), A._shift_hue(x.bfloat16().float(), factors), atol=1 / 128, rtol=0)


def test_color_jitter_hue_is_torchvision_adjust_hue_with_a_factor_per_image():
    import torchvision.transforms.functional as TF
    x = colour_batch().float() / 255
    out = A.color_jitter(x, gen(0), brightness=0, contrast=0, saturation=0, hue=0.1, p=1.0)
    u = torch.rand((B, 4), generator=gen(0))                      # the draws color_jitter makes
    factors = -0.1 + 0.2 * u[:, 3]
    expected = torch.stack([TF.adjust_hue(img, f.item()) for img, f in zip(x, factors)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert factors.std() > 0.03                                   # the factors do differ per image


# ----------------------------------------------------------------------------
# the same as torchvision for the same parameters
# ----------------------------------------------------------------------------

def tv_crop_params(n, H, W, scale, ratio, seed=0):
    """(n, 4) boxes (top, left, h, w) from torchvision's own RandomResizedCrop (v2), seeded; the
    global RNG is left as it was."""
    from torchvision.transforms import v2
    transform = v2.RandomResizedCrop((H, W), scale=scale, ratio=ratio)
    image = torch.zeros(1, H, W)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        boxes = [transform.make_params([image]) for _ in range(n)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes], dtype=torch.float32)


@pytest.mark.parametrize("H, W, scale", [(28, 28, (0.08, 1.0)), (28, 28, (0.7, 1.0)), (20, 33, (0.08, 1.0))])
def test_crop_boxes_are_drawn_as_torchvision_get_params(H, W, scale):
    from scipy.stats import ks_2samp
    ratio = (3 / 4, 4 / 3)
    ours = torch.stack(A.crop_boxes(100_000, H, W, gen(0), scale, ratio), dim=1)
    theirs = tv_crop_params(10_000, H, W, scale, ratio)
    for boxes in (ours, theirs):                      # whole pixels, inside the image: nothing clipped
        top, left, h, w = boxes.T
        assert torch.equal(boxes, boxes.round()) and (h >= 1).all() and (w >= 1).all()
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    # mean top, left, height, width, area and how often the box is the whole image (torchvision's
    # fallback on a square image): each within 4 standard errors of torchvision's. Clipping boxes
    # instead of drawing them again would give a mean area of 0.532 against 0.491 at scale 0.08-1.
    stats = lambda b: torch.stack([*b.T, b[:, 2] * b[:, 3] / (H * W), ((b[:, 2] == H) & (b[:, 3] == W)).float()], 1)
    a, b = stats(ours), stats(theirs)
    standard_error = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() <= 4 * standard_error + 1e-9).all(), (a.mean(0), b.mean(0))
    assert ks_2samp(a[:10_000, 4].numpy(), b[:, 4].numpy()).pvalue > 1e-3      # the whole area distribution


@pytest.mark.parametrize("H, W", [(28, 28), (20, 33), (40, 20)])
def test_crop_boxes_fall_back_to_torchvision_central_crop(H, W):
    # the whole area at an aspect of 2-3 never fits: the central crop, its aspect clamped into 2-3
    ours = torch.stack(A.crop_boxes(8, H, W, gen(0), scale=(1.0, 1.0), ratio=(2.0, 3.0)), dim=1)
    assert torch.equal(ours, tv_crop_params(8, H, W, (1.0, 1.0), (2.0, 3.0)))


@pytest.mark.parametrize("C, H, W", [(1, 28, 28), (3, 28, 28), (3, 20, 33)])
def test_resized_crop_is_torchvision_resized_crop(C, H, W):
    import torchvision.transforms.v2.functional as TF
    n = 32
    x = torch.rand(n, C, H, W, generator=gen(1))
    top, left, h, w = A.crop_boxes(n, H, W, gen(0))
    # and the edges: the whole image, a 1 x 1 box in a corner, a full-height strip on the right edge
    top[:3], left[:3] = torch.tensor([0.0, H - 1, 0]), torch.tensor([0.0, 0, W - 3])
    h[:3], w[:3] = torch.tensor([H, 1.0, H]), torch.tensor([W, 1.0, 3])
    out = A.resized_crop(x, top, left, h, w)
    for antialias in (True, False):                   # every box is enlarged: antialias changes nothing
        expected = torch.stack([TF.resized_crop(img, int(t), int(l), int(hh), int(ww), [H, W], antialias=antialias)
                                for img, t, l, hh, ww in zip(x, top, left, h, w)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the op is crop_boxes then resized_crop, with the same draws
    assert torch.equal(A.random_resized_crop(x, gen(5)), A.resized_crop(x, *A.crop_boxes(n, H, W, gen(5))))


ORDERS = torch.tensor(list(itertools.permutations(range(4))))     # all 24 orders of the four ops


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("off", [(), ("contrast",), ("brightness", "hue"), ("saturation",)])
def test_jitter_is_torchvision_adjust_ops_in_each_images_order(C, off):
    import torchvision.transforms.v2.functional as TF
    assert (A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE) == (0, 1, 2, 3)   # torchvision's fn_idx
    n = 2 * len(ORDERS)
    x = colour_batch(n, side=12).float() / 255 if C == 3 else torch.rand(n, 1, 12, 12, generator=gen(1))
    g = gen(2)
    factors = {name: 0.2 + 1.6 * torch.rand(n, generator=g) for name in ("brightness", "contrast", "saturation")}
    factors["hue"] = 0.4 * torch.rand(n, generator=g) - 0.2
    factors.update({name: None for name in off})
    order = ORDERS.repeat(2, 1)
    out = A.jitter(x, order, **factors)
    adjust = [("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
              ("saturation", TF.adjust_saturation), ("hue", TF.adjust_hue)]
    expected = []
    for b, img in enumerate(x):
        for op in order[b].tolist():
            name, fn = adjust[op]
            if factors[name] is not None:
                img = fn(img, factors[name][b].item())
        expected.append(img)
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=0)


def test_color_jitter_draws_its_factors_and_an_order_per_image():
    n = 240
    x = colour_batch(n, side=8).float() / 255
    out = A.color_jitter(x, gen(0), p=1.0)                         # BYOL's 0.4 / 0.4 / 0.2 / 0.1
    g = gen(0)                                                     # the draws color_jitter makes
    u = torch.rand((n, 4), generator=g)
    order = torch.rand((n, 4), generator=g).argsort(dim=1)
    expected = A.jitter(x, order, 0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1], 0.8 + 0.4 * u[:, 2], 0.2 * u[:, 3] - 0.1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, A.jitter(x, ORDERS[:1].expand(n, 4), 0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1],
                                            0.8 + 0.4 * u[:, 2], 0.2 * u[:, 3] - 0.1), atol=1e-3)   # order matters
    counts = torch.unique(order, dim=0, return_counts=True)[1]     # each image its own order, all 24 seen
    assert len(counts) == 24 and counts.min() >= 2


@pytest.mark.parametrize("C, k", [(1, 3), (3, 7), (1, 23)])
def test_blur_is_torchvision_gaussian_blur_with_each_images_sigma(C, k):
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(8, C, 40, 40, generator=gen(1))
    sigma = 0.1 + 1.9 * torch.rand(8, generator=gen(2))
    expected = torch.stack([TF.gaussian_blur(img, [k, k], [s.item(), s.item()]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(A.blur(x, sigma, k), expected, atol=1e-5, rtol=0)
    # the op, with one sigma in pixels: the kernel is 10% of the side, odd (5 px at 40 px)
    out = A.gaussian_blur(x, gen(0), p=1.0, sigma=(1.3, 1.3), sigma_relative_to=None)
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [1.3, 1.3]) for img in x])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_blur_rule_measured_on_real_images_at_28_and_64_px(real_root):
    import os
    import numpy as np

    def first_images(name, n=256):
        with np.load(os.path.join(real_root, name)) as npz:
            return torch.from_numpy(npz["train_images"][:n]).float().div(255)[:, None]

    byol = dict(p=1.0, sigma=(0.1, 2.0), kernel_frac=0.1, sigma_relative_to=224)
    for name in ("breastmnist.npz", "pneumoniamnist.npz"):        # 28 px
        x = first_images(name)
        # what the blur would do even at its largest sigma, 2.0 x 28 / 224 = 0.25 px (3 px kernel)
        change = (A.blur(x, torch.full((len(x),), 0.25), 3) - x).abs() * 255
        assert change.mean() < 0.02 and change.max() < 0.5          # grey levels; measured 0.007, 0.1
        assert A.gaussian_blur(x, gen(0), **byol) is x               # so it is off
    x = first_images("breastmnist_64.npz")                          # 64 px: sigma up to 0.57 px, 7 px kernel
    change = (A.gaussian_blur(x, gen(0), **byol) - x).abs() * 255
    assert change.mean() > 0.3 and (change >= 0.5).float().mean() > 0.1   # measured 0.6 and 0.27
    assert A.blur_is_off(37) and not A.blur_is_off(38)              # BYOL's range: on from 38 px


@pytest.mark.parametrize("spec", list(A.NAMES) + ["base+blur"])
def test_size_note_names_a_blur_that_is_off_and_off_is_no_blur_step(spec):
    note = A.size_note(A.views(spec), 28)
    if spec in ("paper001", "byol+"):                               # sigma 1-2 in pixels: on at any side
        assert note is None
    else:
        assert note.startswith("the Gaussian blur is off at 28 px") and "blurs from 38 px up" in note
    assert A.size_note(A.views(spec), 64) is None
    imgs = colour_batch()                                           # 28 px: an off blur draws nothing
    without = tuple([(fn, kw) for fn, kw in view if fn is not A.gaussian_blur] for view in A.views(spec))
    a, b = A.two_views(imgs, spec, gen(3)), A.two_views(imgs, without, gen(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) == (note is not None)


# ----------------------------------------------------------------------------
# presets and two_views
# ----------------------------------------------------------------------------

def test_preset_names():
    assert A.NAMES == tuple(A.PRESETS)
    assert set(A.NAMES) == {"byol", "paper001", "byol+", "simclr", "moco_v2", "paper002", "paper003"}
    # MoCo v2 (Chen, Fan, Girshick, He 2020): crop floor 0.2, jitter 0.4/0.4/0.4/0.1, blur p 0.5, flip last
    moco = dict((fn, kw) for fn, kw in A.PRESETS["moco_v2"][0])
    assert moco[A.random_resized_crop]["scale"] == (0.2, 1.0) and moco[A.gaussian_blur]["p"] == 0.5
    assert [moco[A.color_jitter][k] for k in ("brightness", "contrast", "saturation", "hue", "p")] == [0.4] * 3 + [0.1, 0.8]
    assert A.PRESETS["moco_v2"][0][-1][0] is A.horizontal_flip and A.PRESETS["moco_v2"][0] == A.PRESETS["moco_v2"][1]
    byol_plus, paper001 = A.PRESETS["byol+"][0], A.PRESETS["paper001"][0]
    assert byol_plus[: len(paper001)] == paper001
    assert [fn for fn, _ in byol_plus[len(paper001):]] == [A.cutout, A.contrast, A.brightness]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("preset", sorted(A.PRESETS))
def test_two_views_contract(preset, C, device):
    imgs = torch.randint(0, 256, (B, C, H, W), generator=gen(1), dtype=torch.uint8).to(device)
    v1, v2 = A.two_views(imgs, preset, gen(0, device))
    for v in (v1, v2):
        assert v.shape == imgs.shape and v.dtype == torch.float32 and v.device == imgs.device
        assert v.min() >= 0 and v.max() <= 1
    assert not torch.equal(v1, v2)
    assert imgs.dtype == torch.uint8                  # input untouched


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("preset", sorted(A.PRESETS))
def test_two_views_per_image_randomness(preset, C):
    imgs = (copies(C) * 255).round().to(torch.uint8)
    for v in A.two_views(imgs, preset, gen(0)):
        assert n_distinct(v) >= B // 2


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("preset", sorted(A.PRESETS))
def test_two_views_reproducible(preset, C):
    imgs = (copies(C) * 255).round().to(torch.uint8)
    a, b, c = (A.two_views(imgs, preset, gen(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_two_views_accepts_step_pairs_and_rejects_floats():
    imgs = torch.randint(0, 256, (B, 1, H, W), generator=gen(1), dtype=torch.uint8)
    flip = [(A.horizontal_flip, {"p": 1.0})]
    v1, v2 = A.two_views(imgs, (flip, []), gen(0))
    torch.testing.assert_close(v1, imgs.flip(-1).float() / 255)
    torch.testing.assert_close(v2, imgs.float() / 255)
    with pytest.raises(ValueError):
        A.two_views(imgs.float(), "byol", gen(0))


@pytest.mark.parametrize("spec", list(A.NAMES) + [A.PAPER002_MENU])
def test_crop_scale_override_changes_only_the_crop(spec):
    v1, v2 = A.views(spec, crop_scale=[0.5, 1.0])
    crops = [kw for fn, kw in v1 + v2 if fn is A.random_resized_crop]
    assert crops and all(kw["scale"] == (0.5, 1.0) for kw in crops)
    for new, old in zip((v1, v2), A.views(spec)):
        assert [(fn, {k: v for k, v in kw.items() if k != "scale"}) for fn, kw in new] == \
               [(fn, {k: v for k, v in kw.items() if k != "scale"}) for fn, kw in old]
        assert [kw for fn, kw in new if fn is not A.random_resized_crop] == \
               [kw for fn, kw in old if fn is not A.random_resized_crop]
    assert A.views(spec, crop_scale=None) == A.views(spec)       # no override: the steps as they are
    if spec in A.PRESETS:
        assert A.views(spec) is A.PRESETS[spec]


@pytest.mark.parametrize("crop_scale", [(0.0, 1.0), (2.0, 1.0), (0.6, 0.5), (0.5, 1.5), (-0.1, 1.0)])
def test_crop_scale_out_of_range_is_refused(crop_scale):
    with pytest.raises(ValueError, match=r"0 < MIN <= MAX <= 1"):
        A.views("byol", crop_scale)


# ----------------------------------------------------------------------------
# paper 002's augmentation menu (vertical flip, equalize, perspective,
# rotation, Gaussian noise) and the Barlow Twins views
# ----------------------------------------------------------------------------

NEW_OPS = {
    "vertical_flip": (A.vertical_flip, {"p": 0.5}),
    "equalize": (A.equalize, {"p": 0.5}),
    "perspective": (A.perspective, {"p": 1.0}),
    "rotation": (A.rotation, {"p": 1.0}),
    "gaussian_noise": (A.gaussian_noise, {"p": 1.0}),
}
NEW_MASK_ONLY = {"vertical_flip", "equalize"}      # deterministic op, random per-image mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(NEW_OPS))
def test_new_op_contract(name, C, dtype, device):
    fn, kwargs = NEW_OPS[name]
    x = torch.rand(B, C, H, W, generator=gen(1)).to(device=device, dtype=dtype)
    out = fn(x, gen(0, device), **kwargs)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", sorted(NEW_OPS))
def test_new_op_per_image_randomness_reproducibility_and_p0(name, C):
    fn, kwargs = NEW_OPS[name]
    x = copies(C)
    out = fn(x, gen(0), **kwargs)
    if name in NEW_MASK_ONLY:
        assert n_distinct(out) == 2                    # applied to some images, not to others
    else:
        assert n_distinct(out) >= B // 2               # each image draws its own parameters
    assert torch.equal(fn(x, gen(7), **kwargs), fn(x, gen(7), **kwargs))
    assert not torch.equal(fn(x, gen(7), **kwargs), fn(x, gen(8), **kwargs))
    assert torch.equal(fn(x, gen(0), **{**kwargs, "p": 0.0}), x)


def test_new_ops_leave_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for C in (1, 3):
        for fn, kwargs in NEW_OPS.values():
            fn(copies(C), gen(0), **kwargs)
        A.two_views((copies(C) * 255).to(torch.uint8), A.views("paper002"), gen(0))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("C", [1, 3])
def test_vertical_flip_p1_is_torch_flip(C):
    x = torch.rand(B, C, H, W, generator=gen(1))
    assert torch.equal(A.vertical_flip(x, gen(0), p=1.0), torch.flip(x, dims=[-2]))


@pytest.mark.parametrize("C", [1, 3])
def test_equalize_matches_torchvision_on_uint8_images(C):
    import torchvision.transforms.functional as TF
    u8 = torch.randint(0, 256, (B, C, H, W), generator=gen(1), dtype=torch.uint8)
    u8[0] = 7                                          # one level only: left as it is
    u8[1, ..., :10] = 30                               # a skewed histogram
    u8[2] = (u8[2] // 4) + 100                         # a narrow range, stretched by equalization
    out = A.equalize(u8.float() / 255, gen(0), p=1.0)
    assert torch.equal((out * 255).round().to(torch.uint8), TF.equalize(u8))


@pytest.mark.parametrize("C", [1, 3])
def test_rotation_by_90_degrees_is_rot90_counter_clockwise(C):
    x = torch.rand(B, C, H, W, generator=gen(1))
    out = A.rotation(x, gen(0), p=1.0, degrees=(90.0, 90.0))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    angles_differ = A.rotation(copies(C), gen(0), p=1.0, degrees=20.0)
    assert n_distinct(angles_differ) == B


def test_perspective_without_distortion_is_identity_and_fills_corners_with_zero():
    x = torch.rand(B, 1, H, W, generator=gen(1)) * 0.5 + 0.5     # no zero pixel
    torch.testing.assert_close(A.perspective(x, gen(0), p=1.0, distortion=0.0), x, atol=1e-5, rtol=0)
    out = A.perspective(x, gen(0), p=1.0, distortion=0.9)
    corners = out[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).float().mean() > 0.5                    # image squeezed off most corners
    assert (out[..., H // 2, W // 2] > 0).all()                   # the centre stays image


def test_gaussian_noise_std_is_relative_to_the_image_mean():
    x = torch.full((256, 1, H, W), 0.5)
    out = A.gaussian_noise(x, gen(0), p=1.0, relative_sigma=(0.1, 0.1))   # std 0.05 for a 0.5 image
    std = (out - x).std(dim=(1, 2, 3))
    assert abs(std.mean().item() - 0.05) < 0.003
    assert abs((out - x).mean().item()) < 1e-3
    dark = A.gaussian_noise(x * 0.2, gen(0), p=1.0, relative_sigma=(0.1, 0.1))
    assert abs((dark - x * 0.2).std().item() - 0.01) < 0.002


def test_menu_runs_in_a_fixed_order_and_rejects_unknown_names():
    a = A.menu("base+noise+vflip")
    b = A.menu("vflip+base+noise")
    assert a == b and [fn for fn, _ in a] == [A.random_resized_crop, A.horizontal_flip, A.vertical_flip,
                                              A.gaussian_noise]
    assert A.views("paper002")[0] == A.menu(A.PAPER002_MENU) == A.views(A.PAPER002_MENU)[1]
    assert A.views("paper002")[1] == A.menu("noise+blur+perspective+equalize+vflip+base")
    full = "+".join(A.MENU)
    assert len(A.menu(full)) == sum(len(steps) for steps in A.MENU.values())
    with pytest.raises(ValueError, match="unknown augmentation 'vlfip'"):
        A.menu("base+vlfip")
    with pytest.raises(ValueError, match="named twice"):
        A.menu("base+blur+blur")


def test_paper003_views_are_asymmetric_and_crop_override_works():
    v1, v2 = A.views("paper003")
    kw = lambda steps, fn: [k for f, k in steps if f is fn][0]
    assert kw(v1, A.random_resized_crop)["scale"] == (0.7, 1.0) and kw(v1, A.rotation)["degrees"] == 10.0
    assert (kw(v1, A.gaussian_blur)["p"], kw(v2, A.gaussian_blur)["p"]) == (1.0, 0.1)
    assert (kw(v1, A.solarize)["p"], kw(v2, A.solarize)["p"]) == (0.0, 0.2)
    w1, _ = A.views("paper003", crop_scale=(0.5, 1.0))
    assert kw(w1, A.random_resized_crop)["scale"] == (0.5, 1.0)
    assert A.views("byol") is A.PRESETS["byol"]


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("spec", ["paper002", "paper003", "+".join(A.MENU)])
def test_barlow_views_contract_and_per_image_randomness(spec, C):
    imgs = (copies(C) * 255).round().to(torch.uint8)
    v1, v2 = A.two_views(imgs, A.views(spec), gen(0))
    for v in (v1, v2):
        assert v.shape == imgs.shape and v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1
        assert n_distinct(v) >= B // 2
    assert not torch.equal(v1, v2)


def test_finetune_augmentation_contract():
    x = copies(3)
    out = A.apply_steps(x, A.FINETUNE_AUG["paper003"], gen(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and n_distinct(out) >= B // 2
    assert A.apply_steps(x, A.FINETUNE_AUG["none"], gen(0)) is x


def test_presets_menu_and_finetune_aug_only_use_tested_ops():
    steps = [s for v in A.MENU.values() for s in v] + [s for s in A.FINETUNE_AUG["paper003"]]
    steps += [s for pair in A.PRESETS.values() for v in pair for s in v]
    assert {fn.__name__ for fn, _ in steps} <= set(OPS) | set(NEW_OPS)


# ----------------------------------------------------------------------------
# views(): the one entry point of every script's --aug
# ----------------------------------------------------------------------------

MENU_SPECS = list(A.MENU) + ["base+" + n for n in A.MENU if n != "base"] + ["+".join(A.MENU), A.PAPER002_MENU]


@pytest.mark.parametrize("spec", list(A.NAMES) + MENU_SPECS)
def test_every_preset_and_menu_string_parses_into_two_views_of_known_ops(spec):
    v1, v2 = A.views(spec)
    known = set(OPS) | set(NEW_OPS)
    for view in (v1, v2):
        assert view and all(callable(fn) and fn.__name__ in known and isinstance(kw, dict) for fn, kw in view)
    if spec not in A.PRESETS:                                       # a menu: both views draw from it
        assert v1 is v2 and v1 == A.menu(spec)


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("spec, same", [
    ("byol", "byol"),                                               # a name given to two_views directly
    ("paper002", A.PAPER002_MENU),                                  # the preset and its menu string
    ("paper002", "noise + blur+perspective+equalize+vflip+base"),  # any order, spaces
    ("base+rotation", "rotation+base"),
])
def test_equivalent_specs_give_identical_views(spec, same, C):
    imgs = (copies(C) * 255).round().to(torch.uint8)
    a = A.two_views(imgs, A.views(spec), gen(4))
    b = A.two_views(imgs, same, gen(4))                            # two_views also takes the string
    c = A.two_views(imgs, A.views(same, crop_scale=None), gen(4))
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


@pytest.mark.parametrize("spec, bad", [("nonsense", "nonsense"), ("base+vlfip", "vlfip"), ("byol+noise", "byol"),
                                       ("paper002+rotation", "paper002"), ("BYOL", "BYOL"), ("base+", "")])
def test_invalid_spec_names_the_culprit_and_every_valid_value(spec, bad):
    with pytest.raises(ValueError) as err:
        A.views(spec)
    message = str(err.value)
    assert f"unknown augmentation {bad!r}" in message and "\n" not in message
    assert all(name in message for name in A.NAMES) and all(item in message for item in A.MENU)


@pytest.mark.parametrize("spec", ["", "  ", None, 3, ("byol",)])
def test_empty_or_non_string_spec_is_refused(spec):
    with pytest.raises(ValueError, match="name a preset"):
        A.views(spec)


def test_rotation_is_the_one_menu_item_applied_to_every_image():
    # paper 002's code applies RandomRotation(20) outside its p=0.5 wrapping; every other extra op at 0.5
    probs = {name: [kw.get("p") for fn, kw in steps] for name, steps in A.MENU.items()}
    assert probs.pop("rotation") == [1.0]
    assert probs.pop("base") == [None, 0.5]
    assert all(p == [0.5] for p in probs.values())
    imgs = (copies(1) * 255).round().to(torch.uint8)
    v1, v2 = A.two_views(imgs, "rotation", gen(0))
    x = imgs.float() / 255
    assert all((v != x).flatten(1).any(dim=1).all() for v in (v1, v2))   # no image left unrotated


# ----------------------------------------------------------------------------
# SimCLR's views (Chen et al. 2020, App. A)
# ----------------------------------------------------------------------------

def test_simclr_preset_has_chen_et_al_parameters_for_both_views():
    v1, v2 = A.views("simclr")
    assert v1 == v2                                                 # one distribution for both views
    kw = {fn: k for fn, k in v1}
    assert [fn for fn, _ in v1] == [A.random_resized_crop, A.horizontal_flip, A.color_jitter, A.grayscale,
                                    A.gaussian_blur]
    assert kw[A.random_resized_crop]["scale"] == (0.08, 1.0) and kw[A.horizontal_flip]["p"] == 0.5
    jitter = kw[A.color_jitter]
    assert [jitter[k] for k in ("brightness", "contrast", "saturation", "hue", "p")] == \
           pytest.approx([0.8, 0.8, 0.8, 0.2, 0.8])                 # strength s = 1: 0.8s, 0.8s, 0.8s, 0.2s
    assert kw[A.grayscale]["p"] == 0.2
    assert kw[A.gaussian_blur]["p"] == 0.5 and kw[A.gaussian_blur]["sigma"] == (0.1, 2.0)


def test_simclr_views_differ_and_grayscale_about_one_image_in_five():
    n = 2000
    imgs = colour_batch(n, side=8)
    v1, v2 = A.two_views(imgs, "simclr", gen(0))
    assert not torch.equal(v1, v2)
    # whole-pixel boxes, as torchvision's: at 8 px two images now and then get the same crop and flip
    # and no colour change (p=0.2 each)
    assert n_distinct(v1) > 0.98 * n
    # only the grayscale step makes the three channels equal (saturation factors stay >= 0.2)
    for v in (v1, v2):
        gray = (v[:, 0] == v[:, 1]).flatten(1).all(1) & (v[:, 1] == v[:, 2]).flatten(1).all(1)
        assert abs(gray.float().mean().item() - 0.2) < 0.03


# ----------------------------------------------------------------------------
# no host syncs: nothing inside the ops reads a device value or builds a tensor from Python values
# ----------------------------------------------------------------------------

SYNCING_OPS = {"_local_scalar_dense", "item", "_linalg_check_errors", "lift_fresh", "nonzero", "is_nonzero"}


@pytest.mark.parametrize("spec", list(A.NAMES) + ["+".join(A.MENU)])
def test_views_dispatch_no_host_sync_and_build_no_constants(spec):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    imgs = colour_batch(8)
    A.two_views(imgs, spec, gen(0))                                 # first call: constants cached
    with Ops() as ops:
        A.two_views(imgs, spec, gen(0))
    assert ops.names and not ops.names & SYNCING_OPS
    assert A._const(A._LUMA, torch.device("cpu"), torch.float32) is A._const(A._LUMA, torch.device("cpu"),
                                                                               torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", list(A.NAMES) + ["+".join(A.MENU)])
def test_views_run_under_cuda_sync_debug_mode_error(spec):
    imgs = colour_batch(8).cuda()
    A.two_views(imgs, spec, gen(0, "cuda"))                         # warm: constants cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v1, v2 = A.two_views(imgs, spec, gen(0, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert v1.is_cuda and v2.shape == imgs.shape


def test_bench_augment_times_every_preset_and_both_hue_shifts(tmp_path):
    import json
    import math
    from benchmarks import bench_augment
    out = tmp_path / "bench.json"
    bench_augment.main(["--sizes", "8", "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert set(figures["two_views"]) == {f"{spec}@8" for spec in list(A.NAMES) + ["+".join(A.MENU)]}
    assert set(figures["ops"]) == {"random_resized_crop@8", "color_jitter@8"}
    assert set(figures["hue"]) == {"yiq (approximate)@8", "hsv (exact)@8"}
    assert all(math.isfinite(r) and r > 0 for r in [*figures["two_views"].values(), *figures["ops"].values(),
                                                    *figures["hue"].values()])
    # the baseline is a real approximation: far from the exact shift
    x = colour_batch().float() / 255
    turns = torch.full((B,), 0.1)
    err_old = (bench_augment.yiq_hue(x, turns) - A._shift_hue(x, turns)).abs().mean() * 255
    assert err_old > 5


# ----------------------------------------------------------------------------
# multi-crop (DINO): local views resized to a smaller side, their steps, and the views of a batch
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("C, H, W, size", [(1, 28, 28, 12), (3, 64, 64, 28), (3, 20, 33, 8), (1, 28, 28, 40)])
def test_resized_crop_to_a_size_is_torchvision_resized_crop_without_antialias(C, H, W, size):
    import torchvision.transforms.v2.functional as TF
    n = 32
    x = torch.rand(n, C, H, W, generator=gen(1))
    top, left, h, w = A.crop_boxes(n, H, W, gen(0), scale=(0.05, 1.0))
    top[:2], left[:2], h[:2], w[:2] = torch.tensor([0.0, H - 1]), torch.tensor([0.0, 0]), \
        torch.tensor([H, 1.0]), torch.tensor([W, 1.0])              # the whole image, a 1 x 1 box in a corner
    out = A.resized_crop(x, top, left, h, w, size=size)
    assert out.shape == (n, C, size, size)
    # boxes larger than `size` are shrunk: bilinear without a low-pass filter first, antialias=False
    expected = torch.stack([TF.resized_crop(img, int(t), int(l), int(hh), int(ww), [size, size], antialias=False)
                            for img, t, l, hh, ww in zip(x, top, left, h, w)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    crop = A.random_resized_crop(x, gen(5), scale=(0.05, 0.4), size=size)
    assert torch.equal(crop, A.resized_crop(x, *A.crop_boxes(n, H, W, gen(5), (0.05, 0.4)), size=size))


@pytest.mark.parametrize("side, multiple, expected", [(28, 2, 12), (64, 2, 28), (224, 2, 96), (28, 4, 12),
                                                      (64, 8, 24), (224, 16, 96), (32, 16, 16)])
def test_local_side_is_dinos_96_of_224_in_whole_multiples(side, multiple, expected):
    assert A.local_side(side, multiple) == expected


def test_local_view_is_the_global_view_on_a_small_crop_with_dinos_blur():
    global_view = A.views("byol", A.GLOBAL_CROP_SCALE)[0]
    local = A.local_view(global_view, 96, 224)
    assert [fn for fn, _ in local] == [fn for fn, _ in global_view]
    kw = dict(local)
    assert kw[A.random_resized_crop] == {"scale": (0.05, 0.4), "ratio": (3 / 4, 4 / 3), "size": 96}
    # DINO blurs its 96 px local crops with p 0.5 and the global views' 0.1-2 px: sigma 2 px at 96 px
    assert kw[A.gaussian_blur]["p"] == 0.5 and kw[A.gaussian_blur]["sigma_relative_to"] == 96
    assert kw[A.color_jitter] == dict(global_view)[A.color_jitter] and kw[A.solarize]["p"] == 0
    assert dict(A.local_view(global_view, 12, 28, scale=(0.1, 0.3)))[A.random_resized_crop]["scale"] == (0.1, 0.3)
    assert dict(A.local_view(global_view, 12, 28))[A.gaussian_blur]["sigma_relative_to"] == 96
    with pytest.raises(ValueError, match="no random resized crop"):
        A.local_view(A.views("vflip+blur")[0], 12, 28)


def test_multi_crop_views_their_sizes_scales_and_order_of_draws():
    n, C, side = 64, 1, 12
    imgs = (copies(C, n) * 255).round().to(torch.uint8)
    pair = A.views("byol", A.GLOBAL_CROP_SCALE)
    local = A.local_view(pair[0], side, H)
    (g1, g2), locals_ = A.multi_crop(imgs, pair, local, 3, gen(0))
    assert g1.shape == g2.shape == (n, C, H, W) and len(locals_) == 3
    assert all(v.shape == (n, C, side, side) and v.dtype == torch.float32 and 0 <= v.min() <= v.max() <= 1
               for v in locals_)
    # the global views are two_views' from the same draws; the local views follow, each its own
    first, second = A.two_views(imgs, pair, gen(0))
    assert torch.equal(g1, first) and torch.equal(g2, second)
    assert not torch.equal(locals_[0], locals_[1]) and n_distinct(locals_[0]) >= n // 2
    again = A.multi_crop(imgs, pair, local, 3, gen(0))
    assert all(torch.equal(a, b) for a, b in zip(locals_, again[1]))
    # a local crop covers 5-40% of the image; a global one 40-100%: on a horizontal ramp the span of
    # columns a view shows (its crop's width) tells them apart
    ramp = torch.linspace(0, 255, W).round().to(torch.uint8).expand(n, 1, H, W).contiguous()
    only_crops = ([(A.random_resized_crop, dict(scale=A.GLOBAL_CROP_SCALE))],) * 2
    (wide, _), (small,) = A.multi_crop(ramp, only_crops, A.local_view(only_crops[0], side, H), 1, gen(1))
    width = lambda v: (v.amax(dim=(1, 2, 3)) - v.amin(dim=(1, 2, 3))) * (W - 1)   # noqa: E731
    assert width(small).max() < (0.4 * 4 / 3) ** 0.5 * W and width(wide).min() > (0.4 * 3 / 4) ** 0.5 * W - 2
