"""The pretraining methods: every pretrain_<method>.py at the repository's root. The per-method tests,
the benchmarks and the GPU check read this list, so a new method's file is all they need to cover it.

Each file declares, at module level, LABEL (its name in tables and figures), CPU_CONFIG (its CPU-scale config under configs/) and SMOKE_FLAGS
(the flags that make a run of a few seconds on the CPU: small heads, a cheap augmentation). They are read
from the source without importing it, so that listing the methods imports no torch."""
import ast
import glob
import os
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class MethodInfo:
    name: str          # "byol" for pretrain_byol.py; the checkpoint's meta["method"]
    label: str         # "BYOL": its name in tables and figures
    script: str        # pretrain_byol.py, relative to the repository's root
    cpu_config: str    # configs/cpu_byol.yaml
    smoke_flags: tuple  # a few-second CPU run's own flags, added to a test's data and step flags


def _declared(path, names):
    """The literal values of module-level assignments `names` in the Python file `path`."""
    found = {}
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{os.path.basename(path)} declares no {', '.join(missing)} (see common/methods.py)")
    return found


def all_methods(repo=REPO):
    """Every pretraining method, sorted by name."""
    methods = []
    for path in sorted(glob.glob(os.path.join(repo, "pretrain_*.py"))):
        script = os.path.basename(path)
        found = _declared(path, ("LABEL", "CPU_CONFIG", "SMOKE_FLAGS"))
        methods.append(MethodInfo(script[len("pretrain_"):-3], found["LABEL"], script, found["CPU_CONFIG"],
                                  tuple(found["SMOKE_FLAGS"])))
    return methods


def names(repo=REPO):
    return [m.name for m in all_methods(repo)]


def get(name, repo=REPO):
    for method in all_methods(repo):
        if method.name == name:
            return method
    raise KeyError(f"no pretraining method {name!r}; methods: {', '.join(names(repo))}")
