"""SimCLR pretraining of a ResNet encoder on the train images of a dataset (labels unused).

SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): two views of every image, a 2-layer MLP projector, and the NT-Xent loss that pulls each
view towards its partner and away from the other 2N - 2 views of the batch. The method medical imaging uses
most (paper 001 §2.1 counts 13 SimCLR papers against 3 for BYOL).

    python pretrain_simclr.py --data pneumoniamnist --epochs 100
    torchrun --nproc_per_node=4 pretrain_simclr.py --data chestmnist --batch-size 1024 --temperature 0.1 --sync-bn
"""
import argparse
import functools

import torch
import torch.nn.functional as F

from common import augment, cli, data, dist, models, optim, pretrain


def get_args_parser():
    parser = argparse.ArgumentParser("SimCLR pretraining", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, data_help="dataset(s) whose train images are the unlabeled corpus: MedMNIST 2D "
                         "flags, .npz files, folders or CSV manifests (docs/DATA.md), several joined by commas "
                         "(default pneumoniamnist)")
    parser.set_defaults(arch="resnet18", stem="imagenet", in_chans=3)

    # * SimCLR
    g = parser.add_argument_group("SimCLR")
    g.add_argument("--temperature", type=float, default=0.5,
                   help="NT-Xent temperature tau (default 0.5, Chen et al.'s CIFAR-10 setting; 0.1 for "
                        "ImageNet-scale batches of 4096)")
    g.add_argument("--aug", default="simclr", type=augment.checked_spec,
                   help="view augmentations, a preset or paper 002's menu string (default simclr: random resized "
                        "crop, flip, colour jitter of strength 0.8 with p 0.8, grayscale p 0.2, blur; Chen et al. "
                        "App. A)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: the preset's, 0.08 1 as in SimCLR)")
    g.add_argument("--projector-hidden", type=int, default=2048,
                   help="projector hidden width (default 2048: SimCLR's, the ResNet-50 feature width)")
    g.add_argument("--projector-out", type=int, default=128, help="projection size (default and SimCLR: 128)")

    # * Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--init", default="random", help="random | imagenet | <checkpoint or .pth> (default random)")
    g.add_argument("--epochs", type=int, default=100, help="epochs (default 100; Chen et al.: 100 to 1000)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, split evenly over torchrun's processes; every other view in the "
                        "batch is a negative (default 256; Chen et al.: 256 to 8192)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "lars"],
                   help="adam (default) or lars (Chen et al.: LARS at lr 0.3 x batch / 256)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, for Adam)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="weight decay (default and Chen et al.: 1e-6)")
    g.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                   help="cosine decay to 0 after --warmup-epochs (default, Chen et al.) or constant")
    g.add_argument("--warmup-epochs", type=int, default=10,
                   help="linear warm-up epochs (default and Chen et al.: 10)")
    cli.add_pretrain_flags(parser)
    # what --compile covers differs between the methods: its help says it
    return parser


def nt_xent_loss(z1, z2, temperature):
    """NT-Xent (Chen et al. 2020 Eq. 1), averaged over all 2N views: for view i with partner j,
    -log( exp(sim(i, j) / t) / sum_{k != i} exp(sim(i, k) / t) ), sim the cosine similarity. In float32."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def forward_loss(args, online, x1, x2):
    """NT-Xent of two views (input tensors) through `online` (encoder + projector, bf16 autocast on CUDA),
    over the global batch. What --compile compiles."""
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=x1.device.type == "cuda"):
        z1, z2 = online(x1), online(x2)
    # every view of the global batch is a negative: gather all ranks' projections (autograd sees the
    # all-gather, so gradients reach each rank's own rows; DDP's mean then gives the one-process gradient)
    return nt_xent_loss(dist.all_rows(z1), dist.all_rows(z2), args.temperature)


def train_step(args, online, optimizer, views, aug_gen, steps_per_epoch, batch, step, loss_fn=forward_loss):
    """One SimCLR step on a uint8 global batch (`loss_fn`: forward_loss, or its compiled form under
    --compile). Returns its loss and the step's lr."""
    lr = optim.schedule_step(optimizer, args.lr_schedule, step, args.epochs * steps_per_epoch, args.lr,
                             args.warmup_epochs * steps_per_epoch)
    x1, x2 = (data.to_input(dist.my_rows(v), args.in_chans).contiguous(memory_format=torch.channels_last)
              for v in augment.two_views(batch, views, aug_gen))
    loss = loss_fn(args, online, x1, x2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), {"lr": lr}


def main():
    args = cli.parse_args(get_args_parser())

    # ---- data: the train split(s), whole, as uint8 on the device; the run directory, resumed if unfinished
    run = pretrain.setup("pretrain_simclr", vars(args), args.device)

    # ---- model: encoder + 2-layer MLP projector (Chen et al. §2.1: the loss is taken after it)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans)
    projector = models.mlp(models.FEATURE_DIM[args.arch], args.projector_hidden, args.projector_out)
    modules = {"encoder": encoder, "projector": projector}
    pretrain.place(modules, run.device, args.sync_bn)
    online = dist.distributed(torch.nn.Sequential(encoder, projector), run.device)

    # ---- optimiser
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *projector.parameters()],
                                     args.lr, args.weight_decay, run.device)
    print(f"{len(run.images)} images, {run.steps_per_epoch} steps/epoch, {2 * args.batch_size - 2} negatives "
          f"per view" + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))

    # ---- loop: common/pretrain.py (resume, checkpoints, log, kNN monitor)
    loss_fn = pretrain.compile_loss(forward_loss, run.device) if args.compile else forward_loss
    step = functools.partial(train_step, args, online, optimizer, run.views, run.generator, run.steps_per_epoch,
                             loss_fn=loss_fn)
    method = pretrain.Method("simclr", modules, optimizer, step)
    pretrain.train(method, run)


if __name__ == "__main__":
    cli.run_main(main)
