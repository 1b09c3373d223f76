"""MoCo v2 pretraining of an encoder on the train images of a dataset (labels unused).

MoCo (He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual Representation Learning")
contrasts each query (one view through the trained encoder) with its positive key (the other view through a
momentum copy of it) and with a queue of the keys of earlier batches as negatives, by the InfoNCE loss. MoCo v2
(Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning") adds SimCLR's 2-layer
MLP head, blur and cosine lr, at temperature 0.2. --queue-size 0 takes the negatives from the batch's other
keys instead, as MoCo v3 does (Chen, Xie, He 2021, Alg. 1), without v3's predictor.

    python pretrain_moco.py --config configs/cpu_moco.yaml --out runs/moco-cpu
    python pretrain_moco.py --config configs/moco_v2.yaml
    torchrun --nproc_per_node=8 pretrain_moco.py --config configs/moco_v2.yaml
"""
import os

from common import cli
from common.errors import UserError


# the method list (common/methods.py): its name in tables, its CPU config, the flags of a run of seconds
LABEL = "MoCo v2"
CPU_CONFIG = "configs/cpu_moco.yaml"
SMOKE_FLAGS = ["--projector-hidden", "32", "--projector-out", "16", "--queue-size", "64", "--bn-splits", "1",
               "--aug", "moco_v2"]


def get_args_parser():
    parser = cli.pretrain_parser("MoCo v2 pretraining", __doc__)
    cli.set_defaults(parser, aug="moco_v2", epochs=200, batch_size=256, optimizer="sgd",
                     lr=0.03, weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0, notes={
                         "aug": "moco_v2: SimCLR's crop (area 0.2-1), flip, grayscale and blur with a colour jitter "
                                "of 0.4, 0.4, 0.4, 0.1 (Chen et al. 2020b)",
                         "epochs": "MoCo v2: 200 (800 for its best)",
                         "batch_size": "MoCo v2: 256 over 8 GPUs",
                         "optimizer": "MoCo: sgd (momentum 0.9)",
                         "lr": "MoCo v2: 0.03 at batch 256, scaled by batch / 256",
                         "weight_decay": "MoCo: 1e-4, on every parameter",
                         "lr_schedule": "MoCo v2: cosine (v1: x0.1 at epochs 120 and 160 of 200)",
                         "warmup_epochs": "MoCo v2: none"})
    cli.add_ema_flags(parser, momentum=0.999, schedule="constant")
    cli.set_defaults(parser, notes={"ema": "MoCo's key encoder, He et al. Eq. 2 and §4.1: 0.999",
                                    "ema_schedule": "MoCo v2: constant"})

    # * MoCo
    g = parser.add_argument_group("MoCo")
    g.add_argument("--temperature", type=float, default=0.2,
                   help="InfoNCE temperature tau (default and MoCo v2: 0.2; v1: 0.07)")
    g.add_argument("--queue-size", type=int, default=4096, metavar="K",
                   help="negatives: a queue of the keys of the last K images (He et al.: 65536 on ImageNet's 1.28M); "
                        "default 4096, kept under a corpus of ~4.7k images (PneumoniaMNIST's train split) less a "
                        "batch, so that an image's own key of the previous epoch has left the queue before it "
                        "comes back as a query; 0: no queue, the other keys of the global batch are the negatives "
                        "(MoCo v3's, Chen, Xie, He 2021)")
    g.add_argument("--symmetric", action="store_true",
                   help="also take the second view as query against the first view's key and average the two "
                        "losses (MoCo v3 and the MoCo authors' CIFAR-10 demo sum them: the same step at twice the "
                        "lr); twice the forward passes; default off: MoCo v2's one query per image")
    g.add_argument("--bn-splits", type=int, default=8, metavar="S",
                   help="BatchNorm groups of the global batch: both encoders normalise each 1/S of the batch on its "
                        "own, the keys' batch shuffled first, so that a query and its positive key share BatchNorm "
                        "statistics only by chance, 1 in S (MoCo's shuffling BN, He et al. §3.3: 8 GPUs of 32 images; "
                        "default 8); 1: one group, the batch statistics a query and its key share leak the positive "
                        "(MoCo without shuffling BN); under torchrun a multiple of the processes, each normalising "
                        "its own rows, or 1 with --sync-bn")
    g.add_argument("--projector-hidden", type=int, default=2048,
                   help="projection head hidden width (default 2048: MoCo v2's, the ResNet-50 feature width)")
    g.add_argument("--projector-out", type=int, default=128, help="projection size (default and MoCo: 128)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

import torch
import torch.nn.functional as F

from common import augment, dist, ema, models, optim, pretrain


def check(args):
    """Refuse BatchNorm groups the global batch cannot be cut into, before anything is written (the
    torchrun processes from torchrun's WORLD_SIZE: the process group starts later)."""
    if args.bn_splits < 1 or args.batch_size % args.bn_splits or args.batch_size // args.bn_splits < 2:
        raise UserError(f"--bn-splits {args.bn_splits} must cut --batch-size {args.batch_size} into equal groups of "
                        f"2 or more images; use a divisor of the batch size of at most {args.batch_size // 2}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.sync_bn and args.bn_splits > 1:
        raise UserError(f"--sync-bn normalises the global batch as one group, --bn-splits {args.bn_splits} asks for "
                        f"{args.bn_splits}: drop --sync-bn (each process normalises its own rows in "
                        f"--bn-splits / {world} groups) or give --bn-splits 1")
    if world > 1 and not args.sync_bn and args.bn_splits % world:
        raise UserError(f"--bn-splits {args.bn_splits} is not a multiple of the {world} torchrun processes, each of "
                        f"which normalises its own rows; use a multiple of {world}, or --bn-splits 1 --sync-bn")


def projection_head(in_dim, hidden_dim, out_dim):
    """MoCo v2's head: Linear-ReLU-Linear, no BatchNorm (Chen et al. 2020b §2, after SimCLR's)."""
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(hidden_dim, out_dim))


def info_nce_loss(q, keys, queue, temperature, first=0):
    """InfoNCE (He et al. 2020 Eq. 1), averaged over the queries q (n, d) of this process: query i's positive
    is keys[first + i] of the global batch's keys (unit length, no gradient); its negatives are the rows of
    `queue` (K, d, unit length), or, with no queue (None), the other keys of the batch (MoCo v3, Chen, Xie,
    He 2021 Alg. 1). -log( exp(q.k+ / t) / sum over k+ and the negatives of exp(q.k / t) ). In float32."""
    q = F.normalize(q.float(), dim=1)
    positive = first + torch.arange(len(q), device=q.device)
    if queue is None:
        logits, target = q @ keys.T, positive
    else:  # the positive's logit first, then the queue's (He et al. Alg. 1)
        logits = torch.cat([(q * keys[positive]).sum(1, keepdim=True), q @ queue.T], dim=1)
        target = torch.zeros_like(positive)
    return F.cross_entropy(logits / temperature, target)


@torch.no_grad()
def enqueue(queue, pointer, keys):
    """MoCo's queue update (He et al. §3.2, Alg. 1): the global batch's `keys` overwrite the oldest rows of
    `queue` (K, d), from row `pointer` (a 0-d long tensor) on and wrapping around its end, and `pointer` moves
    past them: first in, first out. A batch larger than the queue leaves its last K keys. In place, with no
    host sync, so that the checkpoint's queue and pointer are the step's."""
    size, n = len(queue), len(keys)
    kept = keys[-size:]
    rows = (pointer + (n - len(kept)) + torch.arange(len(kept), device=queue.device)) % size
    queue.index_copy_(0, rows, kept.to(queue.dtype))
    pointer.copy_((pointer + n) % size)


def in_groups(net, x, groups):
    """net(x) with BatchNorm over each of `groups` equal chunks of x: what `groups` GPUs compute on their shares."""
    if groups == 1:
        return net(x)
    return torch.cat([net(chunk) for chunk in x.chunk(groups)])


def keys_of(key_net, x, order, groups):
    """Unit-length keys of the global batch (original order, float32, every rank the same) from this rank's rows
    `x` of the batch shuffled by `order`: MoCo's shuffling BN (He et al. §3.3), an image's key most often in
    another BatchNorm group than its query."""
    shuffled = dist.all_rows(F.normalize(in_groups(key_net, x, groups).float(), dim=1))
    return torch.empty_like(shuffled).index_copy_(0, order, shuffled)  # row order[j] is shuffled row j


def forward_loss(online, key_net, queries, shuffled, order, queue, temperature, groups, precision):
    """The InfoNCE loss of this rank's queries (one view, or both with --symmetric) against the other view's
    keys, and the first pair's keys of the global batch for the queue, in the run's `precision`. `queries`: this
    rank's rows of the views; `shuffled`: this rank's rows of the other views, shuffled by `order`. The key
    encoder runs in training mode without gradient: its BatchNorm uses batch statistics, as MoCo's does.
    What --compile compiles."""
    first = dist.rank() * len(queries[0])
    losses, queue_keys = [], None
    with precision.autocast(queries[0].device.type):
        for x_query, x_key in zip(queries, shuffled):
            q = in_groups(online, x_query, groups)
            with torch.no_grad():
                keys = keys_of(key_net, x_key, order, groups)
            # both terms contrast with the queue as it stood before the step
            losses.append(info_nce_loss(q, keys, queue, temperature, first))
            queue_keys = keys if queue_keys is None else queue_keys
    return sum(losses) / len(losses), queue_keys


def build(args, run):
    # ---- model: query encoder + MLP head; key encoder + head = their momentum copy (He et al. Eq. 2)
    encoder = models.load_encoder(args.init, args.arch, args.stem, args.in_chans, size=args.size,
                                  patch_size=args.patch_size, pool=args.pool)
    head = projection_head(models.feature_dim(encoder), args.projector_hidden, args.projector_out)
    key_encoder, key_head = ema.frozen_copy(encoder), ema.frozen_copy(head)
    modules = {"encoder": encoder, "projector": head, "key_encoder": key_encoder, "key_projector": key_head}
    pretrain.place(modules, run)
    online = dist.distributed(torch.nn.Sequential(encoder, head), run.device)
    key_net = torch.nn.Sequential(key_encoder, key_head)

    # Shuffling BN. MoCo trains on 8 GPUs, each normalising its 32 images, and shuffles the keys' batch across
    # them, so that a query and its positive key are mostly normalised with other images' statistics: otherwise
    # the statistics they share give the positive away (He et al. §3.3). One process emulates the 8 GPUs with
    # --bn-splits groups and a shuffle (as the MoCo authors' one-GPU CIFAR-10 demo does); under torchrun each
    # rank normalises its own rows in --bn-splits / ranks groups, the same groups as one process. --sync-bn
    # joins every rank's rows into one group: MoCo without shuffling BN, or MoCo v3's global BatchNorm.
    world = dist.world_size()
    groups = 1 if run.sync_bn and world > 1 else args.bn_splits // world  # check() refused the others

    # ---- the queue of negatives (He et al. §3.2): random unit vectors until keys replace them, the same on
    # every rank (every rank draws them after the same seed); saved and restored with the run (Method.state)
    state = {}
    if args.queue_size:
        queue = F.normalize(torch.randn(args.queue_size, args.projector_out, device=run.device), dim=1)
        state = {"queue": queue, "queue_pointer": torch.zeros((), dtype=torch.long, device=run.device)}
        if args.queue_size > len(run.index) - args.batch_size:
            print(f"note: --queue-size {args.queue_size} holds more keys than the {len(run.index)} images of an "
                  f"epoch less a batch: a query's own image from the previous epoch is among its negatives; "
                  f"a --queue-size of at most {max(len(run.index) - args.batch_size, 1)} avoids it", flush=True)

    # ---- optimiser
    optimizer = optim.make_optimizer(args.optimizer, [*encoder.parameters(), *head.parameters()],
                                     args.lr, args.weight_decay, run.device)
    loss_fn = pretrain.compiled(forward_loss, run)

    # ---- step
    def step(batch, i):
        """One MoCo step on a uint8 global batch: lr and momentum, two views and the keys' shuffle, InfoNCE,
        an optimiser step, the key encoder's EMA (the same on every rank: DDP keeps the query encoder the
        same), then the global batch's keys into the queue (every rank the same queue)."""
        lr = pretrain.set_lr(optimizer, run, i)
        m = ema.momentum(args.ema_schedule, i, run.total_steps, args.ema)
        v1, v2 = augment.two_views(batch, run.views, run.generator)
        order = torch.randperm(len(batch), generator=run.generator, device=batch.device)
        pairs = [(v1, v2), (v2, v1)] if args.symmetric else [(v1, v2)]
        queries = [pretrain.as_input(query, run) for query, _ in pairs]
        shuffled = [pretrain.as_input(key[order], run) for _, key in pairs]
        loss, keys = loss_fn(online, key_net, queries, shuffled, order, state.get("queue"), args.temperature,
                             groups, run.precision)
        pretrain.optimizer_step(optimizer, loss)
        ema.update(key_encoder, encoder, m)
        ema.update(key_head, head, m)
        if state:
            enqueue(state["queue"], state["queue_pointer"], keys)
        return dist.mean_over_ranks(loss.detach()), {"lr": lr, "ema": m}

    if args.queue_size:
        summary = (f"{args.queue_size} negatives per query from the queue (the keys of the last "
                   f"{args.queue_size / args.batch_size:.3g} batches)")
    else:
        summary = f"{args.batch_size - 1} negatives per query from the batch's other keys"
    return pretrain.Method("moco", modules, optimizer, step, state=state, summary=summary)


def main():
    pretrain.main("pretrain_moco", get_args_parser, build, check=check)


if __name__ == "__main__":
    cli.run_main(main)
