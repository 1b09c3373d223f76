"""--compile compiles each pretraining method's whole forward (both views through its networks, and the
loss) once: a run's losses match the eager run's, and a second epoch reuses the graph (Barlow Twins
compiles a second one at its phase change, frozen -> trainable encoder, and no more).

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

SMALL = ["--data", "breastmnist", "--max-steps", "1", "--batch-size", "8", "--device", "cpu"]
COMMANDS = {
    "byol": ["pretrain_byol.py", *SMALL, "--epochs", "2", "--projector-hidden", "32", "--predictor-hidden", "32",
             "--aug", "byol+"],
    # 3 epochs: the frozen one, the first trainable one (a new graph), one more (none)
    "barlow": ["pretrain_barlow.py", *SMALL, "--epochs", "3", "--projector", "32-32", "--aug", "base+vflip+noise",
               "--freeze-encoder-epochs", "1"],
    "simclr": ["pretrain_simclr.py", *SMALL, "--epochs", "2", "--projector-hidden", "32", "--projector-out", "16"],
}
GRAPHS = {"byol": 1, "barlow": 2, "simclr": 1}


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.parametrize("method", sorted(COMMANDS))
def test_compiled_step_matches_eager_and_compiles_once_per_phase(method, real_root, tmp_path, monkeypatch):
    command = [*COMMANDS[method], "--data-root", real_root]
    script = importlib.import_module(command[0].removesuffix(".py"))
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    modes = []
    real_compile = torch.compile

    def compile_counted(fn, mode=None):
        modes.append(mode)
        return real_compile(fn, backend=counter)
    monkeypatch.setattr(torch, "compile", compile_counted)

    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        monkeypatch.setattr("sys.argv", [*command, *extra, "--out", str(tmp_path / name)])
        torch._dynamo.reset()  # graphs cached on forward_loss by an earlier test would not count here
        try:
            script.main()
        finally:
            torch._dynamo.reset()
    assert modes == [None]                                  # the CPU compiles in the default mode
    assert counter.frame_count == GRAPHS[method]            # no graph break, no recompile between epochs
    assert counter.op_count > 100                           # the networks are in the graph, not only the loss
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)
