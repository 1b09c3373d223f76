"""Speed and memory of the training steps the scripts run: images/s and peak memory of every pretraining
method's step (each pretrain_<method>.py of common/methods.py), of feature extraction (the linear probe's
input) and of a fine-tune step, at several image sizes, on the CPU and on CUDA with and without bf16
autocast, channels_last and torch.compile.

    python benchmarks/bench_speed.py                                  # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_speed.py --workloads byol --sizes 28 --variants cuda+bf16+cl --batch 28:256
    python benchmarks/bench_speed.py --out results/speed.json

Each configuration (workload x size x variant) runs in a fresh process (forked from a server that
has done the imports), so that its peak-memory figure is its own:
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats() just before the first
    step (everything allocated: weights, optimiser state, data pool, activations).
  - CPU: peak RSS growth: the process's RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs just before the first step) minus its RSS at that moment (after the
    model, optimiser and data were built). It counts what the steps add: gradients, optimiser state,
    activations, allocator slack and library pages first touched. Where the reset is not possible,
    resource.getrusage(RUSAGE_SELF).ru_maxrss (the lifetime peak) replaces VmHWM; the output says so.
    With compile on the CPU the compiler's own memory lands in this figure too (it runs in warm-up).

A pretraining workload is a method's own step: its script's build(args, run) on an in-memory run
(common.pretrain.in_memory) over the image pool, with the script's default hyper-parameters (plus
--byol-aug, --barlow-aug, --projector and --method-flags). A method places its modules and views in
channels_last and picks bf16 autocast on CUDA itself, so for these workloads a variant's bf16 and cl
switches change nothing. features and finetune are put together from common/supervised.py's parts; only
the switches a variant names differ. Images are random uint8 gray images (the speed does not depend on
content). "images/s" counts source images: a pretraining step on a batch of B images makes 2B views.

Variants: a device (cpu | cuda) joined by '+' to any of bf16 (torch.autocast bf16), cl
(channels_last model and inputs) and compile (the pretraining steps: --compile's compiled forward and
loss, CUDA graphs on CUDA; the evaluation workloads: torch.compile of the encoder).
What the scripts run: their --precision (common/precision.py): cpu+cl at 28 px, cpu+bf16+cl from 48 px on a
CPU with native bf16, cuda+bf16+cl on a GPU.
"""
import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the scripts, and the fork server's sys.path
from common import methods  # noqa: E402  (reads the scripts' sources: no torch import here)

METHODS = tuple(methods.names())
WORKLOADS = (*METHODS, "features", "finetune")
VARIANT_FLAGS = {"bf16": "bf16", "cl": "channels_last", "channels_last": "channels_last", "compile": "compile"}
CPU_BATCH = {28: 64, 224: 8}      # small at 224 px: a ResNet-18 BYOL step on 8 images takes seconds on 2 cores
CUDA_BATCH = {28: 256, 224: 128}  # paper 001's BYOL batch (256) and paper 002's Barlow batch (128)
CHESTMNIST_TRAIN = 78_468         # ChestMNIST train images: the goal is a 28 px BYOL epoch < 4 s on one H100
GOAL_SECONDS = 4.0


def get_args_parser():
    parser = argparse.ArgumentParser("bench_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, any of {', '.join(WORKLOADS)} (a pretraining method's step; "
                             f"features = the frozen-encoder pass of the linear probe; finetune = one all-layer "
                             f"fine-tune step)")
    parser.add_argument("--sizes", default="28,224", help="comma-separated image sides in pixels")
    parser.add_argument("--variants", default="cpu+cl,cuda,cuda+bf16,cuda+bf16+cl,cuda+bf16+cl+compile",
                        help="comma-separated: cpu | cuda, plus any of +bf16 +cl +compile (see above); CUDA "
                             "variants print 'not run: no CUDA' where there is no GPU")
    parser.add_argument("--batch", default=None,
                        help="batch size per image side as SIZE:BATCH pairs, e.g. 28:64,224:8, or one number "
                             f"for every side (default: CPU {CPU_BATCH}, CUDA {CUDA_BATCH}; other sides "
                             f"take the batch of the nearest listed one)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default: CPU 3, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: CPU 1, CUDA 3; compile variants at least 3)")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="backbone")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"],
                        help="imagenet = 7x7/2 conv + max-pool (the scripts' default); small = 3x3/1, no max-pool")
    parser.add_argument("--in-chans", type=int, default=3, choices=[1, 3],
                        help="model input channels (the scripts' default 3 repeats gray images; paper 002 used 1)")
    parser.add_argument("--byol-aug", default=None, help="BYOL views (default: pretrain_byol.py's, byol+)")
    parser.add_argument("--barlow-aug", default=None,
                        help="Barlow Twins views (default: pretrain_barlow.py's, paper 002's final menu)")
    parser.add_argument("--projector", default=None, help="Barlow Twins projector (default: pretrain_barlow.py's, 512)")
    parser.add_argument("--method-flags", action="append", default=[], metavar="METHOD:FLAGS",
                        help="flags of a method's script on top of its defaults, e.g. 'simclr:--temperature 0.1 "
                             "--aug byol'; repeat for several methods")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per configuration")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations run at once; keep 1 for figures (concurrent runs share the cores); "
                             "more only for smoke tests")
    parser.add_argument("--out", default=None, help="write the figures as JSON to this file")
    return parser


# ================================================================ variants and sizes
def parse_variant(text):
    """'cuda+bf16+cl' -> {"name", "device": "cuda", "bf16": True, "channels_last": True, "compile": False}."""
    device, *flags = [t.strip() for t in text.split("+")]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"variant {text!r} must start with cpu or cuda")
    unknown = [f for f in flags if f not in VARIANT_FLAGS]
    if unknown:
        raise ValueError(f"variant {text!r}: unknown switch {unknown[0]!r}; use bf16, cl, compile")
    on = {VARIANT_FLAGS[f] for f in flags}
    return {"name": text, "device": device, "bf16": "bf16" in on, "channels_last": "channels_last" in on,
            "compile": "compile" in on}


def batch_for(spec, size, device):
    """Batch size of an image side: --batch as one number or SIZE:BATCH pairs, else the device's defaults;
    a side not listed takes the batch of the nearest listed side."""
    if spec is None:
        table = CUDA_BATCH if device == "cuda" else CPU_BATCH
    elif ":" not in str(spec):
        return int(spec)
    else:
        table = {int(s): int(b) for s, b in (pair.split(":") for pair in str(spec).split(","))}
    return table[min(table, key=lambda s: abs(s - size))]




# ================================================================ measuring one configuration (in its own process)
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_start(device):
    """Start a peak-memory measurement just before the first step; returns what memory_end needs."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"allocated": torch.cuda.memory_allocated()}
    import resource
    try:
        rss = _status_kib("VmRSS")
    except OSError:  # no /proc: the peak so far stands in for the current RSS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the RSS high-water mark (VmHWM) to the current RSS
        return {"rss_kib": rss, "hwm": True}
    except OSError:  # e.g. a container that forbids it: ru_maxrss, a lifetime peak, replaces VmHWM
        return {"rss_kib": rss, "hwm": False}


def memory_end(device, start):
    """{"peak_memory_mib", "memory_measure", ...}: see the module docstring."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_memory_mib": peak / 2**20, "memory_measure": "CUDA max_memory_allocated",
                "cuda_growth_mib": (peak - start["allocated"]) / 2**20,
                "cuda_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    if start["hwm"]:
        peak_kib = _status_kib("VmHWM")
        measure = "CPU peak RSS growth (VmHWM)"
    else:
        import resource
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        measure = "CPU peak RSS growth (ru_maxrss)"
    return {"peak_memory_mib": (peak_kib - start["rss_kib"]) / 1024, "memory_measure": measure,
            "cpu_peak_rss_mib": peak_kib / 1024}


class FlagError(ValueError):
    """A method's script refused the flags a configuration gave it."""


def method_step(name, argv, device, images):
    """step(i) -> loss: optimiser step i of pretrain_<name>.py's method, built by its own build(args, run)
    from its default flags with `argv` on top, on an in-memory run (no run directory) over the uint8 pool
    `images` on `device`; its batches follow one permutation of the pool, drawn from the run's generator
    before the step's own draws (as the training loop draws them), cycled like epochs. The step carries
    its args, run and method as attributes."""
    import importlib

    import torch

    from common import pretrain
    script = importlib.import_module(f"pretrain_{name}")
    argv = [str(a) for a in argv]

    def refuse(message):  # argparse's error, raised in this process rather than exiting it
        raise FlagError(f"pretrain_{name}.py refuses {shlex.join(argv)}: {message}")
    parser = script.get_args_parser()
    parser.error, parser.allow_abbrev = refuse, False  # a flag of the benchmark's is the script's, in full
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise FlagError(f"pretrain_{name}.py has no flag {unknown[0]}")
    n_batches = len(images) // args.batch_size
    run = pretrain.in_memory(vars(args), images, device, steps=n_batches)
    method = script.build(args, run)
    if method.start_epoch:
        method.start_epoch(0)
    order = torch.randperm(len(images), generator=run.generator, device=images.device)

    def step(i):
        j = i % n_batches
        return method.step(images[order[j * args.batch_size:(j + 1) * args.batch_size]], i)[0]
    step.args, step.run, step.method = args, run, method  # for a benchmark that looks inside
    return step


def build_step(cfg, variant, device, images):
    """A function step(i) running the workload's step i on the pool `images`, and the loss it returns.
    A pretraining method runs its script's own step (method_step) with the configuration's model flags
    and cfg["flags"]; for features and finetune only the lines marked VARIANT differ from the scripts'."""
    import torch

    from common import data, models

    batch_size, workload, in_chans = cfg["batch"], cfg["workload"], cfg["in_chans"]
    if workload in METHODS:
        argv = ["--arch", cfg["arch"], "--stem", cfg["stem"], "--in-chans", in_chans, "--batch-size", batch_size,
                *(["--compile"] if variant["compile"] else []), *cfg.get("flags", ())]
        return method_step(workload, argv, device, images)

    memory_format = torch.channels_last if variant["channels_last"] else torch.contiguous_format  # VARIANT
    gen = torch.Generator(device).manual_seed(0)
    perm = torch.randperm(len(images), generator=gen, device=device)
    n_batches = len(images) // batch_size

    def batch_at(i):  # the scripts' batch: an index slice of the uint8 tensor held on the device
        j = i % n_batches
        return perm[j * batch_size:(j + 1) * batch_size]

    def prepare(x):
        return data.to_input(x, in_chans).contiguous(memory_format=memory_format)

    def autocast():  # VARIANT: evaluate.py runs no autocast
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant["bf16"])

    def place(*modules):
        for m in modules:
            m.to(device, memory_format=memory_format)

    def compiled(module):  # VARIANT: the evaluation workloads compile the encoder
        return torch.compile(module) if variant["compile"] else module

    encoder = models.build_encoder(cfg["arch"], cfg["stem"], in_chans)
    feature_dim = models.FEATURE_DIM[cfg["arch"]]

    if workload == "features":  # models.features, as evaluate.py's linear probe and kNN call it
        place(encoder)
        encoder.eval()
        forward_encoder = compiled(encoder)

        @torch.no_grad()
        def step(i):
            with autocast():  # VARIANT: evaluate.py runs no autocast
                out = forward_encoder(prepare(images[batch_at(i)])).float()
            return out.abs().mean()
        return step

    if workload == "finetune":  # evaluate.finetune + supervised.train_select, --mode finetune defaults (Adam 1e-3)
        import evaluate
        from common import optim, supervised
        args = evaluate.get_args_parser().parse_args(["--mode", "finetune", "--out", "-"])
        head = torch.nn.Linear(feature_dim, 2)  # a binary task, as PneumoniaMNIST / BreastMNIST
        place(encoder, head)
        models.freeze_through(encoder, args.freeze)
        model = torch.nn.Sequential(compiled(encoder), head)
        optimizer = optim.adam(model.parameters(), evaluate.MODE_DEFAULTS["finetune"]["lr"], args.weight_decay, device)
        labels = torch.randint(0, 2, (len(images),), generator=gen, device=device)
        supervised.enter_training(model, args.frozen_bn)

        def step(i):
            idx = batch_at(i)
            with autocast():  # VARIANT: evaluate.py runs no autocast
                loss = supervised.classification_loss(model(prepare(images[idx])), labels[idx], "binary-class")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return step
    raise ValueError(f"unknown workload {workload!r}")


def measure(cfg):
    """Build one configuration, run its warm-up and timed steps, and return its figures."""
    import torch
    variant = parse_variant(cfg["variant"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(variant["device"])
    torch.manual_seed(0)
    batch_size, steps, warmup = cfg["batch"], cfg["steps"], cfg["warmup"]
    # a pool of up to 8 batches of gray uint8 images on the device, cycled through like an epoch
    pool = batch_size * min(8, warmup + steps)
    images = torch.randint(0, 256, (pool, 1, cfg["size"], cfg["size"]), dtype=torch.uint8, device=device)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        step = build_step(cfg, variant, device, images)
        mem = memory_start(device)
        for i in range(warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
            # one block, one sync at its end: a sync per step would drain the GPU queue between steps
            start = time.perf_counter()
            for i in range(warmup, warmup + steps):
                loss = step(i)
            loss = float(loss)  # waits for the device: the timed steps have finished
            step_seconds = [(time.perf_counter() - start) / steps]
        else:
            # the CPU runs each step to its end: time them one by one and take the median, the figure
            # least disturbed by other processes on a shared machine
            step_seconds = []
            for i in range(warmup, warmup + steps):
                start = time.perf_counter()
                loss = float(step(i))
                step_seconds.append(time.perf_counter() - start)
        seconds = statistics.median(step_seconds)
        result.update(memory_end(device, mem))
    except torch.OutOfMemoryError:
        return {**result, "oom": True}
    return {**result, "oom": False, "sec_per_step": seconds, "images_per_sec": batch_size / seconds, "loss": loss,
            "step_seconds": step_seconds}


# ================================================================ parent: a fresh process per configuration
# Each configuration runs in a process of its own, forked from a multiprocessing fork server that
# has imported torch, torchvision and the scripts once: a fresh interpreter would spend ~6 s of CPU
# on those imports per configuration. The server never touches CUDA, so every child starts without
# a CUDA context and its peak-memory figures are its own.
PRELOAD = ["torch", "torchvision", "common.augment", "common.data", "common.models", "common.pretrain",
           *(f"pretrain_{name}" for name in METHODS), "evaluate"]
_context = []


def fork_context():
    if not _context:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context.append(ctx)
    return _context[0]


def child(cfg, connection):
    """Runs in the forked process: measure one configuration and send back its figures."""
    try:
        connection.send(measure(cfg))
    except Exception as e:  # reported in the table; the traceback goes to stderr
        traceback.print_exc()
        connection.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        connection.close()


def _send_cuda_available(connection):
    import torch
    connection.send(torch.cuda.is_available())
    connection.close()


def cuda_available():
    """Asked of a forked child: the fork server has torch imported already, and this process need
    not import it (nor touch CUDA) at all."""
    ctx = fork_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_cuda_available, args=(send,))
    proc.start()
    send.close()
    try:
        answer = receive.recv()
    except EOFError:
        answer = False
    proc.join()
    return answer


def run_config(cfg, timeout=900):
    """One configuration in a fresh process: its figures, or {"error": ...} when it failed."""
    ctx = fork_context()
    receive, send = ctx.Pipe(duplex=False)
    # not a daemon: torch.compile starts worker processes of its own
    proc = ctx.Process(target=child, args=(cfg, send))
    proc.start()
    send.close()
    try:
        result = receive.recv() if receive.poll(timeout) else {"error": f"timed out after {timeout} s"}
    except EOFError:  # the child died without a word (killed, e.g. by the kernel's OOM killer)
        result = None
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = {"error": f"the measuring process died (exit code {proc.exitcode})"}
    return {**cfg, **result}


def run_all(configs, timeout=900, jobs=1):
    """Every configuration, `jobs` at a time; results in the configurations' order."""
    def one(numbered):
        n, cfg = numbered
        print(f"[{n}/{len(configs)}] {cfg['workload']} {cfg['size']} px batch {cfg['batch']} {cfg['variant']}",
              file=sys.stderr, flush=True)
        return run_config(cfg, timeout)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, enumerate(configs, 1)))


def machine_load():
    """1-minute load average and CPU count: on a shared machine, CPU figures taken under a load above
    the core count are slowed by other processes (their memory figures are not)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return {"load_avg_1min": None, "cpus": os.cpu_count()}
    return {"load_avg_1min": round(load, 2), "cpus": os.cpu_count()}


def load_line(before, after):
    return (f"machine load (1-min average) before / after: {before['load_avg_1min']} / {after['load_avg_1min']} "
            f"on {after['cpus']} CPUs")


def epoch_projection(result, n_images=CHESTMNIST_TRAIN):
    """Seconds of one epoch of n_images at the measured step time: the scripts run n_images // batch
    full steps (the last partial batch is dropped)."""
    return (n_images // result["batch"]) * result["sec_per_step"]


def fmt(value, digits=1):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(results):
    lines = ["| workload | px | batch | variant | ms/step | images/s | peak memory (MiB) | memory measure |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['workload']} | {r['size']} | {r['batch']} | {r['variant']} |"
        if r.get("error"):
            lines.append(f"{head} failed | | | {r['error'][:80]} |")
        elif r.get("oom"):
            lines.append(f"{head} out of memory | | | |")
        else:
            lines.append(f"{head} {fmt(1000 * r['sec_per_step'])} | {fmt(r['images_per_sec'])} | "
                         f"{fmt(r['peak_memory_mib'], 0)} | {r['memory_measure']} |")
    return "\n".join(lines)


def method_flags(args):
    """{method: flags of its script on top of its defaults}: --byol-aug, --barlow-aug, --projector and each
    --method-flags METHOD:FLAGS."""
    flags = {name: [] for name in METHODS}
    for name, flag, value in (("byol", "--aug", args.byol_aug), ("barlow", "--aug", args.barlow_aug),
                              ("barlow", "--projector", args.projector)):
        if value is not None:
            flags.setdefault(name, []).extend([flag, value])
    for item in args.method_flags:
        name, _, text = item.partition(":")
        if name not in flags:
            sys.exit(f"error: --method-flags {item!r}: no method {name!r}; use one of {', '.join(METHODS)}")
        flags[name] += shlex.split(text)
    return flags


def main():
    args = get_args_parser().parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        sys.exit(f"error: unknown workload {bad[0]!r}; use {', '.join(WORKLOADS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    except ValueError as e:
        sys.exit(f"error: --variants: {e}")
    has_cuda = any(v["device"] == "cuda" for v in variants) and cuda_available()
    flags = method_flags(args)

    configs, not_run = [], []
    for v in variants:
        if v["device"] == "cuda" and not has_cuda:
            not_run.append({"variant": v["name"], "reason": "no CUDA"})
            continue
        steps = args.steps or (20 if v["device"] == "cuda" else 3)
        warmup = args.warmup if args.warmup is not None else (3 if v["device"] == "cuda" else 1)
        if v["compile"]:
            warmup = max(warmup, 3)  # the first calls compile (forward, then backward)
        for workload in workloads:
            for size in sizes:
                configs.append({"workload": workload, "size": size, "variant": v["name"],
                                "batch": batch_for(args.batch, size, v["device"]), "steps": steps, "warmup": warmup,
                                "arch": args.arch, "stem": args.stem, "in_chans": args.in_chans,
                                "flags": flags.get(workload, []), "threads": args.threads})

    load_before = machine_load()
    results = run_all(configs, args.timeout, args.jobs)
    load_after = machine_load()
    for r in results:
        if "images_per_sec" in r and r["workload"] == "byol":
            r["projected_chestmnist_epoch_s"] = epoch_projection(r)

    threads = sorted({r["threads"] for r in results if "threads" in r})
    names = sorted({r["device_name"] for r in results if "device_name" in r})
    print(f"\n{args.arch}, {args.stem} stem, {args.in_chans} input channel(s); devices: {', '.join(names) or '-'}; "
          f"CPU threads: {', '.join(map(str, threads)) or '-'}; {load_line(load_before, load_after)}\n")
    print(markdown_table(results))
    print("\nimages/s: source images (a pretraining step on B images makes 2B views). ms/step: after the "
          "warm-up steps, the median of the timed steps on the CPU, their mean on CUDA (timed as one block).")
    print("CPU peak RSS growth: high-water mark of the process RSS during warm-up + timed steps minus its RSS "
          "just before them (fresh process per row). CUDA: torch.cuda.max_memory_allocated over the same steps "
          "(weights, optimiser state and data included).")
    for item in not_run:
        print(f"{item['variant']}: not run: {item['reason']}")
    for r in results:
        if "projected_chestmnist_epoch_s" in r and r["size"] == 28:
            print(f"ChestMNIST 28 px BYOL epoch ({CHESTMNIST_TRAIN:,} images = {CHESTMNIST_TRAIN // r['batch']} "
                  f"steps of {r['batch']}) projected from {r['variant']} ({r['device_name']}): "
                  f"{r['projected_chestmnist_epoch_s']:.1f} s (goal on one H100: < {GOAL_SECONDS:g} s"
                  + (f": {'met' if r['projected_chestmnist_epoch_s'] < GOAL_SECONDS else 'NOT met'})"
                     if "H100" in r["device_name"] else ")"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "bench_speed", "argv": sys.argv[1:], "load_before": load_before,
                       "load_after": load_after, "results": results, "not_run": not_run,
                       "memory_measures": {
                           "CPU peak RSS growth (VmHWM)": "VmHWM after a reset through /proc/self/clear_refs just "
                           "before the first step, minus VmRSS at that moment, MiB",
                           "CPU peak RSS growth (ru_maxrss)": "getrusage(RUSAGE_SELF).ru_maxrss after the steps "
                           "(the lifetime peak: no reset available) minus VmRSS before the first step, MiB",
                           "CUDA max_memory_allocated": "torch.cuda.max_memory_allocated() after "
                           "reset_peak_memory_stats() just before the first step, MiB"}}, f, indent=2)
        print(f"wrote {args.out}")
    if any(r.get("error") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
