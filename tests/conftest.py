"""Shared fixtures: the real MedMNIST files (a failure in CI when missing, a skip elsewhere) and
synthetic npz files in MedMNIST's exact layout."""
import ast
import hashlib
import importlib
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_ROOT = os.environ.get("MEDMNIST_ROOT", os.path.join(REPO, "..", "shared", "data", "medmnist"))


@pytest.fixture
def real_root():
    """Folder of the real files; every test using it needs pneumoniamnist.npz and breastmnist.npz."""
    for name in ("pneumoniamnist.npz", "breastmnist.npz", "breastmnist_64.npz"):
        if not os.path.isfile(os.path.join(REAL_ROOT, name)):
            msg = f"real MedMNIST file {name} missing in {REAL_ROOT}"
            pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return REAL_ROOT


def real_arrays(name="breastmnist.npz"):
    """Every array of a real MedMNIST file, for module-scoped fixtures (which cannot use real_root): a
    failure in CI when the file is missing, a skip elsewhere."""
    path = os.path.join(REAL_ROOT, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} missing") if os.environ.get("CI") else pytest.skip(f"{path} missing")
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def write_synthetic(root, flag, n=(40, 10, 12), size=28, channels=1, n_labels=None, n_classes=2, seed=0):
    """A file with MedMNIST's keys, dtypes and shapes: images uint8 (N, H, W) or (N, H, W, 3),
    labels uint8 (N, 1) or (N, L). Returns its MD5, which tests patch in as the expected one."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size) + ((3,) if channels == 3 else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if n_labels:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, n_labels), dtype=np.uint8)
        else:  # every class present in every split
            arrays[f"{split}_labels"] = (np.arange(count) % n_classes).astype(np.uint8)[:, None]
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    path = os.path.join(root, name)
    np.savez_compressed(path, **arrays)
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Make synthetic files in tmp_path and make common.data accept their MD5."""
    from common import data
    sums = {}
    real_md5 = data.expected_md5
    monkeypatch.setattr(data, "expected_md5", lambda flag, size: sums.get((flag, size)) or real_md5(flag, size))

    def make(flag, size=28, **kw):
        sums[(flag, size)] = write_synthetic(str(tmp_path), flag, size=size, **kw)
        return str(tmp_path)
    return make


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every test: the workloads are tiny, so one thread is as fast as several
    on a free machine and much faster on a busy one (idle threads spin against others: 3 tiny BYOL
    steps took 26 s with 2 threads beside another job, 1.5 s with one)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_env(**extra):
    """The environment of a script a test starts: no downloads, no warnings, one thread (the workloads are
    tiny, where thread start-up costs more than it gains), and no GPU: the tests compare runs bit for bit
    and start several processes, which the CPU does deterministically and a one-GPU machine could not
    (two torchrun ranks would ask for cuda:1; cuDNN is not bit-exact by default)."""
    return {**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.fixture(autouse=True)
def cpu_by_default(monkeypatch):
    """--device auto means the CPU in a script's main() run inside a test, for the reasons of cli_env; a
    test that asks for --device cuda still gets it."""
    from common import cli
    pick = cli.pick_device
    monkeypatch.setattr(cli, "pick_device", lambda name: pick("cpu" if name == "auto" else name))


def run_cli(*args, env=None, cwd=REPO):
    """Run a script as a user would (on the CPU: cli_env); returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(**(env or {})), capture_output=True,
                          text=True)


def real_file_root():
    """REAL_ROOT for module-scoped fixtures (which cannot use real_root): a failure in CI when the real
    files are missing, a skip elsewhere."""
    for name in ("pneumoniamnist.npz", "breastmnist.npz"):
        if not os.path.isfile(os.path.join(REAL_ROOT, name)):
            msg = f"real MedMNIST file {name} missing in {REAL_ROOT}"
            pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return REAL_ROOT


def script_main(script):
    """`python <script> ...` in this process: the bodies of the script's `if __name__ == "__main__":` blocks
    in order (the early parse before its heavy imports, then main), run in the imported module's namespace,
    so that a test's monkeypatch of the module applies. It reads sys.argv (monkeypatch it) and exits only
    on an error, as the script does."""
    module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    blocks = [compile(ast.Module(node.body, type_ignores=[]), module.__file__, "exec")
              for node in ast.parse(inspect.getsource(module)).body
              if isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'",
                                                                         "'__main__' == __name__")]
    if not blocks:
        raise ValueError(f"{script} has no `if __name__ == \"__main__\":` block")

    def run():
        for code in blocks:
            exec(code, vars(module))
    return run


def stopping_at_seed(run_seed, stop):
    """evaluate.run_seed that is interrupted (Ctrl-C) when seed `stop` starts: the seeds before it are saved,
    and the run is left unfinished."""
    def run(args, seed, *rest):
        if seed == stop:
            raise KeyboardInterrupt
        return run_seed(args, seed, *rest)
    return run


def run_main(monkeypatch, script, *args):
    """Run `python <script> args` in this process (script_main), with the CLI's environment: no
    downloads (the device is the CPU: cpu_by_default)."""
    monkeypatch.setattr("sys.argv", [script, *map(str, args)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    script_main(script)()


def tiny_run(out, args, images, steps=None):
    """common.pretrain.in_memory's Run for a script's parsed `args` over uint8 `images` on the CPU, writing
    into `out`: a method's build(args, run) and step driven through common/pretrain.py's loop without a
    dataset file."""
    from common import pretrain
    os.makedirs(out, exist_ok=True)
    run = pretrain.in_memory(vars(args), images, "cpu", steps)
    run.out = str(out)
    return run


def digest(folder):
    """SHA-256 of every file under a folder (a run's lock file, which holds the PID, aside): what a
    failed command must leave unchanged."""
    sums = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != ".lock":
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    sums[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return sums


@pytest.fixture
def fresh_state():
    """A test that calls cli.run_main in-process starts with no progress and no pending --overwrite,
    and the SIGTERM handler run_main installs is put back after it."""
    import signal

    from common import errors, rundir
    handler = signal.getsignal(signal.SIGTERM)
    errors.progress.reset()
    yield
    errors.progress.reset()
    rundir._pending.clear()
    signal.signal(signal.SIGTERM, handler)
