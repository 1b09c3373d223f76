"""The project's check on one CUDA GPU (an H100 or H200): every script's smoke run on CUDA, every pretraining
method's step speed eager and compiled, the host-sync audit, kill -9 and resume, one BEiT-large fine-tuning
step and the lightly comparison; about 8 minutes with three pretraining methods, each further method adding
a compiled smoke run and two step speeds (--only and --methods split the check over several calls). It
prints one line per figure, `FIGURE name: value`, as each is measured (a killed run still shows what it
measured), and writes them to <out>/figures.txt.

    python benchmarks/gpu_check.py --out /tmp/gpu-check
    python benchmarks/gpu_check.py --dry-run            # the steps and the commands they run; nothing run

Wheels in .whl/ at the repository's root (medmnist, captum, lightly and what they need that the machine
lacks) are installed first into <out>/site, which every step then imports from. The data are synthetic
(no download): a 28 px uint8 npz in MedMNIST's layout for the smoke runs, 78,468 random 28 px images (the
size of ChestMNIST's train split) for the step speeds, random weights for the BEiTs.

The pretraining methods are those of common/methods.py (every pretrain_<method>.py), or --methods.
Steps, in order:
  smoke   each method's script --compile (bf16 on CUDA; 2 epochs, TORCH_LOGS recompiles counts recompiles
          after the first epoch), evaluate.py linear_probe and finetune of the BYOL encoder, finetune_beit.py
          on a tiny random BEiT saved by save_pretrained
  steps   each method's step (bench_speed.method_step: its script's build(args, run) at its defaults, batch
          256) eager and --compile: images/s and the projected ChestMNIST epoch (306 steps; goal < 4 s)
  audit   tests/test_step_ops.py: aten-op budgets, and no host sync inside a CUDA step
  resume  each --resume method (BYOL by default; its smoke flags) killed with SIGKILL mid-epoch and rerun,
          against an uninterrupted run and against a second uninterrupted run (cuDNN's default kernels are
          not bit-exact run to run: the figure says how far)
  beit    one BEiT-large (hidden 1024, 24 layers, 16 heads, MLP 4096; random) step of the top 5 layers at
          224 px, batch 32, bf16
  lightly benchmarks/bench_lightly.py --device cuda"""
import argparse
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from common import methods  # noqa: E402  (reads the scripts' sources: no torch import here)

CHESTMNIST_TRAIN = 78_468
GOAL_SECONDS = 4.0
PY = "python"  # shown in the dry run; the real runs use sys.executable
BEIT_LARGE = dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, use_mean_pooling=True, use_relative_position_bias=True,
                  layer_scale_init_value=0.1)
TINY_BEIT = dict(image_size=32, patch_size=8, num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64, use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1)
STEP_PARTS = ("smoke", "steps", "audit", "resume", "beit", "lightly")


def get_args_parser():
    parser = argparse.ArgumentParser("gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check", help="working folder (default runs/gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    parser.add_argument("--only", default=",".join(STEP_PARTS),
                        help=f"comma-separated steps to run (default all: {','.join(STEP_PARTS)})")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per speed figure (default 40)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated pretraining methods of the smoke runs and step speeds (default all: "
                             f"{','.join(methods.names())})")
    parser.add_argument("--resume", default="byol",
                        help="comma-separated methods killed and resumed (default byol; all = every method)")
    parser.add_argument("--part", default=None, choices=["steps", "beit"],
                        help="internal: run one in-process part (the steps' speeds or the BEiT-large step)")
    return parser


# ================================================================ the plan: every command a step runs
def method_names(text, flag):
    """The methods of --methods / --resume: all, or names from common/methods.py."""
    names = methods.names()
    if text == "all":
        return names
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen:
        sys.exit(f"error: {flag}: no pretraining method {(unknown or [text])[0]!r}; use all or some of "
                 f"{','.join(names)}")
    return chosen


def plan(out, timed_steps, smoke_methods, resume_methods):
    """[(part, name, argv, env extra, timeout s)]: argv[0] is a repository script or `-m pytest`."""
    data, beit = os.path.join(out, "data", "synthetic.npz"), os.path.join(out, "tiny_beit")
    common = ["--data", data, "--size", "28", "--device", "cuda", "--batch-size", "256"]
    pre = ["--epochs", "2", "--max-steps", "3", "--compile"]
    recompiles = {"TORCH_LOGS": "recompiles"}
    # the evaluations read the BYOL smoke run's encoder (another method's when --methods leaves BYOL out)
    ckpt = os.path.join(out, "byol" if "byol" in smoke_methods else smoke_methods[0], "checkpoint.pt")
    steps = [("smoke", f"pretrain_{name} --compile",
              [methods.get(name).script, *common, *pre, "--out", os.path.join(out, name)], recompiles, 240)
             for name in smoke_methods]
    steps += [
        ("smoke", "evaluate linear_probe", ["evaluate.py", "--ckpt", ckpt, "--data", data, "--size", "28", "--device",
                                            "cuda", "--mode", "linear_probe", "--out", os.path.join(out, "probe")],
         {}, 120),
        ("smoke", "evaluate finetune", ["evaluate.py", "--ckpt", ckpt, "--data", data, "--size", "28", "--device",
                                        "cuda", "--mode", "finetune", "--epochs", "2", "--max-steps", "3",
                                        "--batch-size", "64", "--out", os.path.join(out, "finetune")], {}, 120),
        ("smoke", "finetune_beit (tiny)", ["finetune_beit.py", "--model", beit, "--data", data, "--size", "28",
                                           "--device", "cuda", "--trainable-layers", "2", "--epochs", "1",
                                           "--max-steps", "2", "--batch-size", "32", "--out",
                                           os.path.join(out, "beit")], {}, 120),
        ("steps", "pretraining steps", ["benchmarks/gpu_check.py", "--part", "steps", "--methods",
                                        ",".join(smoke_methods), "--steps", str(timed_steps), "--out", out], {},
         140 * len(smoke_methods)),
        ("audit", "host-sync audit", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_step_ops.py"],
         {}, 180),
    ]
    for name in resume_methods:  # four runs each: check_resume reads them in this order
        info = methods.get(name)
        resume = [info.script, "--data", data, "--size", "28", "--device", "cuda", "--epochs", "2", "--max-steps",
                  "4", "--batch-size", "64", *info.smoke_flags]
        steps += [
            ("resume", f"{name} straight", [*resume, "--out", os.path.join(out, f"resume_{name}_straight")], {}, 180),
            ("resume", f"{name} killed", [*resume, "--save-every", "2", "--out",
                                          os.path.join(out, f"resume_{name}_killed")], {}, 180),
            ("resume", f"{name} rerun", [*resume, "--save-every", "2", "--out",
                                         os.path.join(out, f"resume_{name}_killed")], {}, 180),
            ("resume", f"{name} straight again", [*resume, "--out", os.path.join(out, f"resume_{name}_again")], {},
             180),
        ]
    steps += [
        ("beit", "BEiT-large step", ["benchmarks/gpu_check.py", "--part", "beit", "--out", out], {}, 240),
        ("lightly", "lightly comparison", ["benchmarks/bench_lightly.py", "--device", "cuda", "--steps", "20",
                                           "--repeats", "2", "--images", "16384"], {}, 240),
    ]
    return steps


# ================================================================ reporting
_figures = []


def figure(name, value, out=None):
    line = f"FIGURE {name}: {value}"
    print(line, flush=True)
    _figures.append(line)
    if out:
        with open(os.path.join(out, "figures.txt"), "a") as f:
            f.write(line + "\n")


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


# ================================================================ set-up: wheels, data, tiny BEiT
def install_wheels(out, env):
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "*.whl")))
    if not wheels:
        return
    site = os.path.join(out, "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
    sys.path.insert(0, site)
    env["PYTHONPATH"] = os.pathsep.join([site, REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print(f"installed {len(wheels)} wheels into {site}", flush=True)


def write_data(out):
    """A binary 28 px set in MedMNIST's layout (1,024 / 256 / 256 images) and a tiny random BEiT."""
    import numpy as np
    import torch
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 1024), ("val", 256), ("test", 256)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    path = os.path.join(out, "data", "synthetic.npz")
    np.savez(path, **arrays)
    with open(path + ".json", "w") as f:
        json.dump({"task": "binary-class", "label": {"0": "a", "1": "b"}}, f)
    torch.manual_seed(0)
    folder = os.path.join(out, "tiny_beit")
    BeitForImageClassification(BeitConfig(**TINY_BEIT)).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


# ================================================================ in-process parts
def part_steps(args):
    """Images/s of each method's step (its script's defaults, batch 256, ResNet-18, 3 channels), eager and
    compiled, over 78,468 random 28 px images on the GPU."""
    import torch
    sys.path.insert(0, HERE)
    import bench_speed
    device = torch.device("cuda")
    images = torch.randint(0, 256, (CHESTMNIST_TRAIN, 1, 28, 28), dtype=torch.uint8, device=device)
    for method in method_names(args.methods, "--methods"):
        for compile_flag in ([], ["--compile"]):
            name = f"{method} step {'compiled' if compile_flag else 'eager'}"
            try:
                started = time.perf_counter()
                step = bench_speed.method_step(method, ["--batch-size", 256, "--arch", "resnet18", "--stem",
                                                        "imagenet", "--in-chans", 3, *compile_flag], device, images)
                for i in range(5):  # compiles, records the CUDA graphs
                    step(i)
                torch.cuda.synchronize()
                warm = time.perf_counter() - started
                start = time.perf_counter()
                for i in range(5, 5 + args.steps):
                    loss = step(i)
                float(loss)
                seconds = (time.perf_counter() - start) / args.steps
            except Exception as e:  # one line per figure, the rest goes on
                figure(name, f"FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            epoch = CHESTMNIST_TRAIN // 256 * seconds
            figure(name, f"{256 / seconds:,.0f} images/s, {seconds * 1e3:.2f} ms/step, projected ChestMNIST epoch "
                   f"{epoch:.2f} s (goal < {GOAL_SECONDS:g} s: {'met' if epoch < GOAL_SECONDS else 'NOT met'}), "
                   f"warm-up {warm:.0f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            del step
            torch.cuda.empty_cache()


def part_beit(args):
    """One fine-tuning step of BEiT-large's top 5 layers at 224 px, batch 32, as finetune_beit.py trains."""
    import torch
    import torch.nn.functional as F
    from transformers import BeitConfig, BeitForImageClassification

    import finetune_beit
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**BEIT_LARGE, num_labels=2)).to(device)
    trainable, total = finetune_beit.train_top_layers(model, 5)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    prep = {"size": (224, 224), "mode": "bicubic", "scale": 1 / 255, "normalize": True, "mean": [0.5] * 3,
            "std": [0.5] * 3}  # BeitImageProcessor's defaults for beit-large-patch16-224
    forward = finetune_beit.beit_forward(model, prep, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (32,), device=device)

    def step():
        loss = F.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(5):
        loss = step()
    float(loss)
    seconds = (time.perf_counter() - start) / 5
    figure("BEiT-large top-5 step (224 px, batch 32, bf16)",
           f"{seconds * 1e3:.0f} ms/step, {32 / seconds:,.0f} images/s, {trainable / 1e6:.1f}M of {total / 1e6:.1f}M "
           f"parameters trained, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# ================================================================ the driver
def run(argv, env, extra, timeout, wait=True):
    command = [sys.executable, *argv] if argv[0] == "-m" else [sys.executable, os.path.join(REPO, argv[0]), *argv[1:]]
    proc = subprocess.Popen(command, cwd=REPO, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    return finish(proc, timeout)


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -1, out, err + f"\ntimed out after {timeout} s"
    return proc.returncode, out, err


def check_smoke(name, argv, rc, out, err, seconds, dest):
    if rc != 0:
        figure(f"smoke {name}", f"FAILED (exit {rc}): {last_line(err) or last_line(out)}", dest)
        return
    text = f"ok in {seconds:.0f} s"
    if "--compile" in argv:
        recompiles = err.count("Recompiling function")
        text += f", {recompiles} recompile(s) after the first graph"
        speeds = [line.split("img/s")[0].split()[-1] for line in out.splitlines() if "img/s" in line]
        text += f", epoch img/s {' / '.join(speeds)}" if speeds else ""
    figure(f"smoke {name}", text, dest)


def compare_checkpoints(a_path, b_path):
    """'bit-exact' or the largest relative difference of any floating tensor (and which)."""
    import torch
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    worst, where, unequal = 0.0, "", 0

    def walk(x, y, key):
        nonlocal worst, where, unequal
        if torch.is_tensor(x):
            if not torch.equal(x, y):
                unequal += 1
                if x.is_floating_point():
                    rel = ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
                    if rel > worst:
                        worst, where = rel, key
        elif isinstance(x, dict):
            for k in x:
                if k != "meta" and k in y:
                    walk(x[k], y[k], f"{key}.{k}" if key else str(k))
        elif isinstance(x, (list, tuple)):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{key}[{i}]")
    walk(a, b, "")
    return "bit-exact" if unequal == 0 else f"{unequal} tensors differ, largest relative L2 {worst:.2e} ({where})"


def check_resume(method, steps, env, dest):
    """`method`'s four resume runs (plan's order): one straight and one killed at once, the killed one's
    SIGKILL after its first mid-epoch checkpoint of epoch 1, then its rerun beside a second straight run."""
    import torch
    (_, _, straight, _, _), (_, _, killed, _, _), (_, _, rerun, _, _), (_, _, again, _, _) = steps
    out_killed = killed[killed.index("--out") + 1]
    checkpoint = os.path.join(out_killed, "checkpoint.pt")
    a = run(straight, env, {}, 180, wait=False)
    k = run(killed, env, {}, 180, wait=False)
    deadline = time.time() + 180
    while True:
        if k.poll() is not None or time.time() > deadline:
            figure(f"{method} kill -9 and resume", f"FAILED: the run ended or stalled before a mid-epoch checkpoint "
                   f"({last_line(k.stderr.read() if k.stderr else '')})", dest)
            finish(a, 180)
            return
        if os.path.exists(checkpoint):
            try:
                state = torch.load(checkpoint, weights_only=True, mmap=True)
                if (state["epoch"], state["step_in_epoch"]) >= (1, 1):
                    break
            except Exception:  # being renamed into place
                pass
        time.sleep(0.05)
    k.send_signal(signal.SIGKILL)
    k.wait()
    b = run(again, env, {}, 180, wait=False)
    rc, out, err = run(rerun, env, {}, 180)
    rc_a, _, err_a = finish(a, 180)
    rc_b, _, err_b = finish(b, 180)
    if rc or rc_a or rc_b or "resuming" not in out:
        figure(f"{method} kill -9 and resume", f"FAILED: {last_line(err or err_a or err_b) or 'no resume'}", dest)
        return
    straight_ckpt = os.path.join(straight[straight.index("--out") + 1], "checkpoint.pt")
    again_ckpt = os.path.join(again[again.index("--out") + 1], "checkpoint.pt")
    figure(f"{method} kill -9 mid-epoch + rerun vs uninterrupted (CUDA)",
           compare_checkpoints(straight_ckpt, checkpoint), dest)
    figure(f"{method} uninterrupted vs uninterrupted (CUDA, run-to-run)",
           compare_checkpoints(straight_ckpt, again_ckpt), dest)


def main():
    args = get_args_parser().parse_args()
    out = os.path.abspath(args.out)
    if args.part:
        {"steps": part_steps, "beit": part_beit}[args.part](args)
        return
    only = set(args.only.split(","))
    resume_methods = method_names(args.resume, "--resume")
    steps = [s for s in plan(out, args.steps, method_names(args.methods, "--methods"), resume_methods)
             if s[0] in only]
    if args.dry_run:
        print("wheels: .whl/*.whl installed into <out>/site when present; data: synthetic npz + tiny BEiT in <out>")
        for part, name, argv, extra, timeout in steps:
            env = "".join(f"{k}={v} " for k, v in extra.items())
            print(f"[{part}] {name} (timeout {timeout} s): {env}{shlex.join([PY, *argv])}")
        return
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "figures.txt"), "w").close()
    env = {**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    started = time.time()
    install_wheels(out, env)
    import torch
    figure("device", f"{torch.cuda.get_device_name()} , torch {torch.__version__}", out)
    write_data(out)
    for part, name, argv, extra, timeout in steps:
        if part == "resume":
            continue
        t = time.time()
        rc, stdout, stderr = run(argv, env, extra, timeout)
        if part == "smoke":
            check_smoke(name, argv, rc, stdout, stderr, time.time() - t, out)
        elif part == "audit":
            figure(name, f"{'passed' if rc == 0 else 'FAILED'}: {last_line(stdout)}", out)
        else:
            for line in stdout.splitlines():
                if line.startswith("FIGURE "):
                    _figures.append(line)
                    print(line, flush=True)
                    with open(os.path.join(out, "figures.txt"), "a") as f:
                        f.write(line + "\n")
                elif part == "lightly" and ("images/s" in line or "ratio" in line):
                    figure(f"lightly comparison, {line.split(':')[0].strip()}", line.split(":", 1)[1].strip(), out)
            if rc != 0:
                figure(name, f"FAILED (exit {rc}): {last_line(stderr)}", out)
    resume = [s for s in steps if s[0] == "resume"]
    for i, method in enumerate(resume_methods if resume else []):
        check_resume(method, resume[4 * i:4 * i + 4], env, out)
    figure("gpu_check wall time", f"{time.time() - started:.0f} s", out)


if __name__ == "__main__":
    main()
