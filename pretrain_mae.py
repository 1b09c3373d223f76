"""MAE pretraining of a ViT encoder on the train images of a dataset (labels unused).

MAE (He, Chen, Xie, Li, Dollar, Girshick 2022, "Masked Autoencoders Are Scalable Vision Learners"): each
image is cut into patches, 75% of them are hidden (a new random draw per image), the ViT encoder sees only
the visible ones, and a light Transformer decoder, given the encoded visible patches and a shared mask token
at each hidden position, predicts the hidden patches' pixels; the loss is the mean squared error on the
hidden patches alone, against each patch's pixels normalised by its own mean and variance. The encoder alone
is kept (a plain timm VisionTransformer: evaluate.py and timm load it); the decoder serves the pretraining.

    python pretrain_mae.py --config configs/cpu_mae.yaml --out runs/mae-cpu
    torchrun --nproc_per_node=8 pretrain_mae.py --config configs/mae.yaml
"""
import functools

from common import cli
from common.errors import UserError


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
# (test_vit: timm's own test ViT, 64 wide, 6 blocks)
LABEL = "MAE"
CPU_CONFIG = "configs/cpu_mae.yaml"
SMOKE_FLAGS = ["--arch", "test_vit", "--decoder-depth", "1", "--decoder-width", "32", "--decoder-heads", "2",
               "--aug", "base"]

# AdamW's betas (He et al. Table 8: beta2 0.95, as in Chen et al.'s iGPT, rather than torch's 0.999)
BETAS = (0.9, 0.95)


def get_args_parser():
    parser = cli.pretrain_parser("MAE pretraining", __doc__)
    cli.set_defaults(parser, arch="vit_base_patch16_224", aug="base", crop_scale=[0.2, 1.0], epochs=800,
                     batch_size=4096, optimizer="adamw", lr=2.4e-3, weight_decay=0.05, lr_schedule="cosine",
                     warmup_epochs=40, final_lr_fraction=0.0, notes={
                         "arch": "MAE takes a timm ViT; He et al.: vit_base_patch16_224 (also ViT-L, ViT-H)",
                         "aug": "base = random resized crop and flip, MAE's only augmentation (He et al. App. A.1)",
                         "crop_scale": "He et al.: 0.2 1",
                         "epochs": "He et al. Table 8: 800 (1600 for their best)",
                         "batch_size": "He et al. Table 8: 4096",
                         "optimizer": f"He et al. Table 8: adamw, betas {BETAS[0]}, {BETAS[1]} (used by adam and "
                                      "adamw here); biases and LayerNorm weights without weight decay",
                         "lr": "He et al. Table 8: 1.5e-4 x batch / 256 (2.4e-3 at batch 4096)",
                         "weight_decay": "He et al. Table 8: 0.05",
                         "lr_schedule": "He et al. Table 8: cosine", "warmup_epochs": "He et al. Table 8: 40",
                         "final_lr_fraction": "He et al.: 0"})

    # * MAE
    g = parser.add_argument_group("MAE")
    g.add_argument("--mask-ratio", type=float, default=0.75,
                   help="share of each image's patches hidden from the encoder (default and He et al. §4: 0.75)")
    g.add_argument("--decoder-depth", type=int, default=8,
                   help="Transformer blocks of the decoder (default and He et al. Table 1a: 8)")
    g.add_argument("--decoder-width", type=int, default=512,
                   help="token width of the decoder (default and He et al. Table 1b: 512)")
    g.add_argument("--decoder-heads", type=int, default=16,
                   help="attention heads of each decoder block, a divisor of --decoder-width (default and "
                        "He et al.'s code: 16)")
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="predict the pixels as the encoder sees them; by default (He et al. §3 and Table 1d) the "
                        "target is each patch's pixels normalised by that patch's own mean and standard deviation "
                        "(config key norm_pix_loss: true / false)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from common import augment, dist, models, optim, pretrain


def check(args):
    """Refuse, before anything is written: an --arch that is not a timm ViT, a decoder width its heads cannot
    split, and a mask ratio that hides every patch or none (models.encoder_settings refuses a --patch-size
    that does not divide --size)."""
    if not models.vit_arch(args.arch):
        raise UserError(f"MAE masks the patches of a ViT: --arch {args.arch} is not a timm VisionTransformer; "
                        f"use e.g. --arch vit_base_patch16_224 (or vit_small_patch16_224, vit_tiny_patch16_224)")
    if args.decoder_width % args.decoder_heads:
        raise UserError(f"--decoder-heads {args.decoder_heads} must divide --decoder-width {args.decoder_width}; "
                        f"use e.g. --decoder-heads {max(1, args.decoder_width // 32)}")
    patch = models.encoder_settings(args.arch, args.size, args.patch_size, args.pool)["patch_size"]
    n = (args.size // patch) ** 2
    n_masked = round(args.mask_ratio * n)
    if not 0 < n_masked < n:
        raise UserError(f"--mask-ratio {args.mask_ratio:g} hides {n_masked} of the {n} patches of a {args.size} px "
                        f"image; the encoder needs one visible and the loss one hidden: use a ratio in "
                        f"({0.5 / n:.3g}, {1 - 0.5 / n:.3g}), He et al.'s 0.75")


def n_patches(encoder):
    h, w = encoder.patch_embed.grid_size
    return h * w


# ---------------------------------------------------------------- masking, target and loss
# Written here on timm's modules rather than taken from Hugging Face's ViTMAEForPreTraining, whose encoder is
# not a timm ViT (evaluate.py loads timm's): a step of each costs the same, 578 against 590 ms (ViT-Tiny on
# 4 px patches at 28 px, decoder 2 x 128, batch 64, one CPU thread; medians of 40 interleaved steps).
def random_masking(noise, mask_ratio):
    """He et al. §3 "random sampling": each row of `noise` (B, N), uniform numbers, orders its image's patches;
    the round(mask_ratio x N) with the largest numbers are hidden, the others kept. Returns (keep (B, N_keep),
    the kept patches' indices, in increasing noise; mask (B, N), 1 = hidden)."""
    n = noise.shape[1]
    n_keep = n - round(mask_ratio * n)
    keep = noise.argsort(dim=1)[:, :n_keep]
    mask = torch.ones_like(noise).scatter_(1, keep, 0.0)
    return keep, mask


def patchify(x, patch):
    """(B, C, H, W) -> (B, N, patch x patch x C): the patches in the encoder's token order (row by row), each
    flattened row by row, channels last."""
    B, C, H, W = x.shape
    h, w = H // patch, W // patch
    return x.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch * patch * C)


def pixel_target(x, patch, norm_pix):
    """What the decoder predicts for each patch, in float32: its pixels, normalised per patch with its own
    mean and (unbiased) variance + 1e-6 when `norm_pix` (He et al. §3 "Reconstruction target")."""
    target = patchify(x.float(), patch)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def masked_mse(pred, target, mask):
    """The mean squared error per patch, averaged over the hidden patches only (He et al. §3: "we compute the
    loss only on masked patches"), in float32."""
    per_patch = (pred.float() - target).square().mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ---------------------------------------------------------------- the networks
def sincos_pos_embed(grid, width, n_prefix, device=None):
    """(1, n_prefix + h x w, width): zeros for the prefix (class) tokens, then timm's fixed 2-D sine-cosine
    position embedding of an h x w grid (He et al. App. A.1: sine-cosine in the encoder and the decoder)."""
    patches = build_sincos2d_pos_embed(list(grid), width, device=device)
    return torch.cat([patches.new_zeros(n_prefix, width), patches])[None]


def fix_pos_embed(encoder, sincos):
    """Freeze the encoder's position embedding for pretraining, as He et al.'s is fixed; `sincos`: replace
    it with the 2-D sine-cosine one first (a random init; loaded weights keep theirs)."""
    if encoder.pos_embed is None:
        return
    if sincos:
        n_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed(encoder.patch_embed.grid_size, encoder.pos_embed.shape[-1],
                                                     n_prefix, encoder.pos_embed.device))
    encoder.pos_embed.requires_grad_(False)


class Decoder(nn.Module):
    """MAE's decoder (He et al. §3 "MAE decoder"): a linear map of the encoder's tokens to its width, a shared
    learned mask token at every hidden position, a fixed 2-D sine-cosine position embedding (a buffer, not
    learned), Transformer blocks (timm's), a LayerNorm and a linear map to each patch's pixels."""

    def __init__(self, encoder_width, width, depth, heads, patch_pixels, grid):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, width, 0), persistent=False)
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(width)
        self.pred = nn.Linear(width, patch_pixels)
        # He et al.'s code: Xavier-uniform Linear layers, zero biases, a mask token ~ N(0, 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, keep, n_prefix):
        """(B, N, patch_pixels) predictions for all N patches from the encoder's `latent` tokens (its n_prefix
        prefix tokens, then those of the patches `keep`)."""
        y = self.embed(latent)
        prefix, visible = y[:, :n_prefix], y[:, n_prefix:]
        B, N, width = len(y), self.pos_embed.shape[1], y.shape[-1]
        tokens = self.mask_token.to(y.dtype).expand(B, N, width).scatter(
            1, keep[..., None].expand(-1, -1, width), visible)
        y = torch.cat([prefix, tokens + self.pos_embed.to(y.dtype)], dim=1)   # prefix tokens: no position
        return self.pred(self.norm(self.blocks(y)))[:, n_prefix:]


class MaskedAutoencoder(nn.Module):
    """The encoder (a timm VisionTransformer, through its own modules) on the visible patches, and the decoder:
    one module, for DistributedDataParallel."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x, keep):
        """The encoder's tokens of the visible patches `keep` (B, N_keep) of images x, its prefix (class)
        tokens first: patch embedding, position embedding (timm's _pos_embed, which also prepends the prefix
        tokens and resamples the embedding to another grid), only then the masking (He et al. §3 "MAE
        encoder"), the blocks and the final LayerNorm."""
        e = self.encoder
        tokens = e._pos_embed(e.patch_embed(x))
        k = e.num_prefix_tokens
        visible = tokens[:, k:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        y = e.blocks(e.norm_pre(torch.cat([tokens[:, :k], visible], dim=1)))
        # timm puts the final LayerNorm in `norm` (class-token pooling) or `fc_norm` (mean pooling, where
        # `norm` is an Identity): the tokens take whichever the encoder has
        return e.fc_norm(e.norm(y))

    def forward(self, x, keep):
        return self.decoder(self.encode(x, keep), keep, self.encoder.num_prefix_tokens)


def forward_loss(mae, x, noise, mask_ratio, patch, norm_pix, precision):
    """MAE's loss on this rank's images x (input tensors) with their masking `noise` (B, N): the masked
    autoencoder in the run's `precision`, the target and the loss in float32. What --compile compiles.
    Every image hides the same number of patches, so the mean of the ranks' losses (DDP's mean of their
    gradients) is the global batch's."""
    keep, mask = random_masking(noise, mask_ratio)
    with precision.autocast(x.device.type):
        pred = mae(x, keep)
    return masked_mse(pred, pixel_target(x, patch, norm_pix), mask)


def one_view(batch, run):
    """MAE's single augmented view of a uint8 global batch (the first view of --aug; He et al. App. A.1:
    random resized crop and flip), as this rank's input tensors."""
    view = augment.apply_steps(batch.to(torch.float32).div_(255), run.views[0], run.generator)
    return pretrain.as_input(view, run)


def build(args, run):
    # ---- model: the timm ViT encoder, its position embedding fixed; the light decoder
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    fix_pos_embed(encoder, sincos=args.init == "random")
    patch = encoder.patch_embed.patch_size[0]
    decoder = Decoder(models.feature_dim(encoder), args.decoder_width, args.decoder_depth, args.decoder_heads,
                      patch * patch * run.in_chans, encoder.patch_embed.grid_size)
    modules = {"encoder": encoder, "decoder": decoder}
    pretrain.place(modules, run)
    mae = dist.distributed(MaskedAutoencoder(encoder, decoder), run.device)
    n = n_patches(encoder)

    # ---- optimiser: AdamW with beta2 0.95; biases and LayerNorm weights (1-D) without weight decay, as
    # He et al.'s code (LARS exempts them itself)
    params = [p for m in (encoder, decoder) for p in m.parameters() if p.requires_grad]
    if args.optimizer != "lars":
        params = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = optim.make_optimizer(args.optimizer, params, args.lr, args.weight_decay, run.device)
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = BETAS
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One MAE step on a uint8 global batch: lr, one view, the masking noise of every image of the global
        batch (every rank draws the same and keeps its rows), the loss on the hidden patches, an optimiser
        step."""
        lr = pretrain.set_lr(optimizer, run, i)
        x = one_view(batch, run)
        noise = dist.my_rows(torch.rand((len(batch), n), generator=run.generator, device=batch.device))
        loss = loss_fn(mae, x, noise, args.mask_ratio, patch, args.norm_pix_loss, run.precision)
        pretrain.optimizer_step(optimizer, loss)
        return dist.mean_over_ranks(loss.detach()), {"lr": lr}

    n_keep = n - round(args.mask_ratio * n)
    return pretrain.Method("mae", modules, optimizer, step,
                           summary=f"{n} patches of {patch} px per image, {n_keep} visible to the encoder")


def main():
    pretrain.main("pretrain_mae", get_args_parser, build, check=check)


if __name__ == "__main__":
    cli.run_main(main)
