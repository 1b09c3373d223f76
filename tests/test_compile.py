"""--compile compiles each pretraining method's whole forward (both views through its networks, and the
loss) once, for every method of common/methods.py: a run's losses match the eager run's, and a second
epoch reuses the graph. A method that changes what it trains between epochs (Barlow Twins'
--freeze-encoder-epochs: frozen -> trainable encoder) compiles one more graph at that change, and no more.

The compiler backend here is aot_eager (TorchDynamo's capture and AOTAutograd's forward and backward
graphs, run by eager kernels): what --compile captures and when it recompiles are the same as under
inductor, whose code generation takes minutes on a busy 2-core machine. benchmarks/gpu_check.py runs
the real thing on CUDA."""
import importlib
import json
import os

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from common import methods
from conftest import run_main

METHODS = methods.all_methods()
SMALL = ["--data", "breastmnist", "--max-steps", "1", "--batch-size", "8", "--device", "cpu"]
# a phase change, where a method has one: (its flags, the epochs that show it, the graphs it then makes):
# the frozen epoch, the first trainable one (a new graph), one more (none)
PHASES = {"--freeze-encoder-epochs": (["--freeze-encoder-epochs", "1"], 3, 2)}


def plan(method):
    """(extra flags, epochs, graphs) of a method's run: 2 epochs and one graph, or its phase change."""
    parser = importlib.import_module(method.script.removesuffix(".py")).get_args_parser()
    for option, phase in PHASES.items():
        if option in parser._option_string_actions:
            return phase
    return [], 2, 1


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_compiled_step_matches_eager_and_compiles_once_per_phase(method, real_root, tmp_path, monkeypatch):
    extra, epochs, graphs = plan(method)
    command = [*SMALL, "--data-root", real_root, "--epochs", epochs, *method.smoke_flags, *extra]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    modes = []
    real_compile = torch.compile

    def compile_counted(fn, mode=None):
        modes.append(mode)
        return real_compile(fn, backend=counter)
    monkeypatch.setattr(torch, "compile", compile_counted)

    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()  # graphs cached on forward_loss by an earlier test would not count here
        try:
            run_main(monkeypatch, method.script, *command, *flags, "--out", tmp_path / name)
        finally:
            torch._dynamo.reset()
    assert modes == [None]                                  # the CPU compiles in the default mode
    assert counter.frame_count == graphs                    # no graph break, no recompile between epochs
    assert counter.op_count > 100                           # the networks are in the graph, not only the loss
    assert len(losses(tmp_path / "compiled")) == epochs
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)
