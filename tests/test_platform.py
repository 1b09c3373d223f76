"""The method platform's pieces (common/pretrain.py, common/ema.py, common/optim.py, common/cli.py) on
their own, each in well under a second: a method's persistent state through a checkpoint, the compiled
forward's outputs, SGD, the cosine schedule's floor, the momentum schedules, the methods' notes on the
shared flags, and main()'s refusal of --lr auto."""
import types

import pytest
import torch

from common import cli, ema, optim, pretrain
from common.errors import UserError


# ---------------------------------------------------------------- Method.state
def test_state_is_restored_in_place_for_whoever_holds_it_and_plain_values_are_replaced():
    queue = torch.randn(5, 3, dtype=torch.float64)
    state = {"queue": queue, "pointer": torch.tensor(2), "lr": 0.1}
    step = lambda: queue.sum()  # a step's closure over the tensor, as a method's build makes it  # noqa: E731
    saved = {"queue": torch.randn(5, 3, dtype=torch.float64), "pointer": torch.tensor(4), "lr": 0.25}
    pretrain.restore_state(state, saved)
    assert state["queue"] is queue and torch.equal(queue, saved["queue"])   # the same tensor, every bit
    assert queue.view(torch.int64).equal(saved["queue"].view(torch.int64))
    assert step() == saved["queue"].sum() and state["pointer"].item() == 4
    assert state["lr"] == 0.25


@pytest.mark.parametrize("saved, needle", [
    ({"lr": 0.1}, "the checkpoint has no 'queue'"),
    ({"queue": torch.zeros(4, 3), "lr": 0.1}, "the checkpoint's queue has shape (4, 3), this run's (5, 3)"),
])
def test_a_state_the_checkpoint_lacks_or_of_another_shape_is_one_line(saved, needle):
    state = {"queue": torch.zeros(5, 3), "lr": 0.1}
    with pytest.raises(UserError) as e:
        pretrain.restore_state(state, saved)
    assert needle in str(e.value) and "\n" not in str(e.value) and "another --out" in str(e.value)


def _counting_method():
    """A method whose step counts its steps in a tensor of its state and keeps a plain value there too."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    state = {"count": torch.zeros((), dtype=torch.long), "last_seen": None}
    counted = state["count"]

    def step(batch, i):
        loss = encoder(batch.float().flatten(1)).square().mean()
        pretrain.optimizer_step(optimizer, loss)
        counted.add_(1)                      # the closure's tensor: restored in place on resume
        state["last_seen"] = i
        return loss.detach(), {"count": int(counted)}
    return pretrain.Method("counting", {"encoder": encoder}, optimizer, step, state=state), counted


def test_the_loop_saves_the_state_and_a_resumed_run_continues_from_it(tmp_path):
    images = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run(epochs, state=None):
        return pretrain.Run(torch.device("cpu"), images, steps_per_epoch=2, generator=torch.Generator().manual_seed(0),
                            out=str(tmp_path), state=state, epochs=epochs, batch_size=4)
    method, counted = _counting_method()
    checkpoint = pretrain.train(method, run(1))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["count"].item() == 2 and saved["last_seen"] == 1 and saved["meta"]["modules"] == ["encoder"]

    resumed, counted_again = _counting_method()
    pretrain.train(resumed, run(2, state=saved))
    assert counted_again.item() == 4 and resumed.state["count"] is counted_again   # 2 restored, 2 more
    assert torch.load(checkpoint, weights_only=True)["last_seen"] == 3


def test_state_names_may_not_shadow_the_checkpoints_own_entries(tmp_path):
    method, _ = _counting_method()
    method.state["optimizer"] = torch.zeros(1)
    run = pretrain.Run(torch.device("cpu"), torch.zeros(4, 1, 2, 2, dtype=torch.uint8), 1, torch.Generator(),
                       out=str(tmp_path))
    with pytest.raises(ValueError, match="optimizer"):
        pretrain.train(method, run)


# ---------------------------------------------------------------- pretrain.compiled
def test_compiled_forward_returns_any_nesting_of_tensors_as_copies(monkeypatch):
    """On the CPU with aot_eager (TorchDynamo and AOTAutograd without code generation: inductor takes ~15 s
    to build even this function here). The function hands back one of its inputs unchanged: the compiled
    call's output is a copy of it, not the tensor itself."""
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None: (modes.append(mode), real_compile(fn, backend="aot_eager"))[1])

    def forward_loss(x, y, scale):
        return (x * y).sum() * scale, {"keys": x, "pair": (y.sin(), y + 1)}
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    off = types.SimpleNamespace(compile=False, device=torch.device("cpu"))
    assert pretrain.compiled(forward_loss, off) is forward_loss
    compiled = pretrain.compiled(forward_loss, types.SimpleNamespace(compile=True, device=torch.device("cpu")))
    torch._dynamo.reset()
    try:
        got, expected = compiled(x, y, 2.0), forward_loss(x, y, 2.0)
    finally:
        torch._dynamo.reset()
    assert modes == [None]                                        # the CPU: the default mode
    assert torch.allclose(got[0], expected[0]) and set(got[1]) == {"keys", "pair"}
    assert torch.equal(got[1]["keys"], x) and got[1]["keys"].data_ptr() != x.data_ptr()   # a copy
    assert all(torch.allclose(a, b) for a, b in zip(got[1]["pair"], expected[1]["pair"]))
    assert isinstance(got[1]["pair"], tuple) and len(got[1]["pair"]) == 2


# ---------------------------------------------------------------- optimisers and schedules
def test_sgd_is_torch_sgd_with_momentum_0_9_step_for_step():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    theirs.load_state_dict(ours.state_dict())
    start = ours[0].weight.detach().clone()
    sgd = optim.make_optimizer("sgd", ours.parameters(), 0.1, 1e-4)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is False
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for step in range(4):                                         # momentum carries over; the lr changes
        for net, optimizer in ((ours, sgd), (theirs, reference)):
            optim.schedule_step(optimizer, "cosine", step, 4, 0.1, warmup_steps=1)
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours[0].weight, start)


def test_cosine_ends_at_the_final_fraction_and_the_warm_up_is_unchanged():
    total, warmup, base = 100, 10, 2e-3
    floor = [optim.learning_rate("cosine", s, total, base, warmup, final_fraction=0.001) for s in range(total + 1)]
    zero = [optim.learning_rate("cosine", s, total, base, warmup) for s in range(total + 1)]
    assert floor[:warmup] == zero[:warmup] == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
    assert floor[warmup] == pytest.approx(base) and floor[-1] == pytest.approx(base * 0.001)
    assert zero[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(floor[warmup:], floor[warmup + 1:])) and min(floor[warmup:]) >= base * 0.001
    # half-way through the decay: half-way between the peak and the floor
    assert floor[warmup + 45] == pytest.approx((base + base * 0.001) / 2)
    # the run's schedule reaches it through set_lr
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    run = types.SimpleNamespace(schedule=pretrain.Schedule("cosine", base, warmup, total, 0.001))
    assert pretrain.set_lr(optimizer, run, total) == pytest.approx(base * 0.001)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base * 0.001)


def test_ema_momentum_is_constant_or_a_cosine_to_its_final_value():
    assert [ema.momentum("constant", s, 10, 0.99) for s in (0, 5, 10)] == [0.99] * 3
    cosine = [ema.momentum("cosine", s, 10, 0.996) for s in range(11)]
    assert cosine[0] == pytest.approx(0.996) and cosine[-1] == pytest.approx(1.0)
    assert cosine[5] == pytest.approx((0.996 + 1) / 2) and cosine == sorted(cosine)
    assert ema.momentum("cosine", 10, 10, 0.9, final=0.95) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="unknown momentum schedule"):
        ema.momentum("linear", 0, 10, 0.99)


# ---------------------------------------------------------------- flags and main()
def test_set_defaults_appends_the_papers_notes_and_refuses_unknown_ones():
    parser = cli.pretrain_parser("test", "doc")
    cli.set_defaults(parser, notes={"lr": "Chen et al.: 0.3 x batch / 256", "epochs": "paper: 800"}, lr=0.3, epochs=7)
    args = parser.parse_args([])
    assert args.lr == 0.3 and args.epochs == 7
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["lr"] == "peak learning rate; Chen et al.: 0.3 x batch / 256"
    assert helps["epochs"].endswith("; paper: 800") and "paper" not in helps["batch_size"]
    with pytest.raises(ValueError, match="notes for flags the parser does not have: queue_size"):
        cli.set_defaults(parser, notes={"queue_size": "MoCo: 65536"})


def test_main_refuses_lr_auto_for_a_method_without_a_range_test(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["pretrain_x.py", "--lr", "auto", "--out", str(out)])
    build = lambda args, run: pytest.fail("built")  # noqa: E731
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: pretrain.main("pretrain_x", lambda: cli.pretrain_parser("x", "doc"), build))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--lr auto (an LR range test) is pretrain_barlow.py's; give pretrain_x.py a number" in err
    assert not out.exists()                                       # refused before the run directory


# ---------------------------------------------------------------- precision of a pretraining run
def test_a_run_records_its_precision_and_a_resume_keeps_it(real_root, tmp_path, monkeypatch, capsys):
    """--precision bf16 trains in bf16 autocast (float32 weights and losses), says so in the checkpoint, and a
    resume continues in what the checkpoint recorded, whatever --precision auto would pick now."""
    from conftest import run_main
    out = tmp_path / "run"
    flags = ["--data", "breastmnist", "--data-root", real_root, "--epochs", "2", "--max-steps", "2", "--batch-size",
             "8", "--projector-hidden", "16", "--projector-out", "8", "--aug", "base", "--precision", "bf16",
             "--out", out]
    with monkeypatch.context() as m:   # stop after the first epoch's checkpoint
        m.setattr(pretrain, "plot_log", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(SystemExit):   # cli.run_main: exit code 130, the checkpoint kept
            run_main(monkeypatch, "pretrain_simclr.py", *flags)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["meta"]["precision"] == "bf16" and state["meta"]["channels_last"] is True
    assert state["meta"]["matmul_small_convs"] is True  # bf16 on a CPU: tiny convolutions as matrix products
    assert all(v.dtype == torch.float32 for v in state["encoder"].values() if v.is_floating_point())
    # whatever this machine's auto rule says now, the resumed run keeps the recorded bf16
    assert pretrain.run_precision("fp32", "cpu", 28, state).bf16
    capsys.readouterr()
    run_main(monkeypatch, "pretrain_simclr.py", *flags)
    assert ("precision: bf16, channels_last, tiny convolutions as matrix products (as the checkpoint was trained)"
            in capsys.readouterr().out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_checkpoint_from_before_precision_resumes_as_it_ran():
    """No recorded precision: such runs ran bf16 on CUDA, float32 on the CPU, both channels_last."""
    legacy = {"meta": {"format": "medssl"}}
    assert pretrain.run_precision("auto", "cpu", 64, legacy) == pretrain.Precision(False, True)
    assert pretrain.run_precision("auto", "cpu", 28, None).channels_last  # 28 px: today's layout
