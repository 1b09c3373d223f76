"""pretrain_moco.py: its InfoNCE and queue against lightly's NTXentLoss with a memory bank, step after step;
the queue's FIFO order; the in-batch (MoCo v3) negatives; shuffling BN; the queue through a checkpoint.
Resume after SIGKILL and the 2-process run: the tests over every method (tests/test_resume.py, test_ddp.py)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import pretrain_moco
from common import cli, precision, pretrain
from common.errors import UserError
from conftest import REPO


def test_loss_and_queue_equal_lightlys_over_consecutive_steps():
    """lightly's NTXentLoss with a memory bank is MoCo's loss: the bank as it stood are the negatives, then the
    keys go in. Three steps with a queue of two batches: the second wraps the pointer, the third sees keys."""
    import lightly.loss as lightly_loss  # requirements-test.txt: a missing lightly fails, never skips
    assert "memory_bank_size" in inspect.signature(lightly_loss.NTXentLoss).parameters
    batch, dim, size, t = 8, 16, 16, 0.2
    torch.manual_seed(0)
    theirs = lightly_loss.NTXentLoss(temperature=t, memory_bank_size=(size, dim))
    queue, pointer = theirs.memory_bank.bank.clone(), torch.zeros((), dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        q = torch.randn(batch, dim, generator=g, requires_grad=True)  # lightly updates its bank for such queries
        k = torch.randn(batch, dim, generator=g)
        expected = theirs(q, k)
        keys = F.normalize(k, dim=1)
        loss = pretrain_moco.info_nce_loss(q, keys, queue, t)
        pretrain_moco.enqueue(queue, pointer, keys)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(queue, theirs.memory_bank.bank)
        assert int(pointer) == int(theirs.memory_bank.bank_ptr)


def test_symmetric_loss_is_the_mean_of_both_views_against_the_queue_before_the_step():
    import lightly.loss as lightly_loss  # requirements-test.txt: a missing lightly fails, never skips
    batch, dim, size, t = 6, 5, 12, 0.2
    torch.manual_seed(0)
    online, key_net = torch.nn.Linear(4, dim), torch.nn.Linear(4, dim)
    x1, x2 = torch.randn(batch, 4), torch.randn(batch, 4)
    queue = F.normalize(torch.randn(size, dim), dim=1)
    order = torch.randperm(batch)
    loss, keys = pretrain_moco.forward_loss(online, key_net, [x1, x2], [x2[order], x1[order]], order, queue, t, 1,
                                            precision.Precision(bf16=False, channels_last=False))
    expected = []
    for q, k in ((online(x1), key_net(x2)), (online(x2), key_net(x1))):
        theirs = lightly_loss.NTXentLoss(temperature=t, memory_bank_size=(size, dim))
        theirs.memory_bank.bank.copy_(queue)
        expected.append(theirs(q, k))
    torch.testing.assert_close(loss, (expected[0] + expected[1]) / 2, rtol=1e-6, atol=1e-6)
    # the keys for the queue are the first pair's, back in the batch's order after the shuffle
    torch.testing.assert_close(keys, F.normalize(key_net(x2), dim=1))
    loss.backward()
    assert online.weight.grad.abs().sum() > 0 and key_net.weight.grad is None


def ring(size, dim, batches):
    """A queue written one key at a time, the oldest overwritten first: what enqueue must leave."""
    queue, pointer = torch.zeros(size, dim), 0
    for keys in batches:
        for key in keys:
            queue[pointer] = key
            pointer = (pointer + 1) % size
    return queue, pointer


@pytest.mark.parametrize("size,sizes", [(5, [3, 3, 3]), (6, [2, 2, 2, 2]), (4, [3, 7, 1])])
def test_enqueue_is_first_in_first_out_and_wraps(size, sizes):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=g) for n in sizes]
    queue, pointer = torch.zeros(size, 3), torch.zeros((), dtype=torch.long)
    for keys in batches:
        pretrain_moco.enqueue(queue, pointer, keys)
    expected, expected_pointer = ring(size, 3, batches)
    assert torch.equal(queue, expected) and int(pointer) == expected_pointer


def test_in_batch_negatives_are_the_other_keys():
    """--queue-size 0: each query's negatives are the batch's other keys, the same loss as a queue of them."""
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(6, 8, generator=g), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    in_batch = pretrain_moco.info_nce_loss(q, keys, None, 0.2)
    per_query = [pretrain_moco.info_nce_loss(q[i:i + 1], keys, torch.cat([keys[:i], keys[i + 1:]]), 0.2, first=i)
                 for i in range(6)]
    torch.testing.assert_close(in_batch, torch.stack(per_query).mean())


def test_shuffled_keys_are_normalised_apart_from_their_queries_group():
    """Shuffling BN: with 2 groups, image 0's key is normalised with the images it was shuffled among
    ({0, 2, 4, 6}), so changing image 1 (the other group) leaves it; with one group it does not."""
    torch.manual_seed(0)
    key_net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    changed = x.clone()
    changed[1] += 3.0
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    with torch.no_grad():
        split = [pretrain_moco.keys_of(key_net, v[order], order, 2) for v in (x, changed)]
        whole = [pretrain_moco.keys_of(key_net, v[order], order, 1) for v in (x, changed)]
    assert torch.equal(split[0][[0, 2, 4, 6]], split[1][[0, 2, 4, 6]])
    assert not torch.equal(split[0][1], split[1][1])
    assert not torch.allclose(whole[0][0], whole[1][0])


def test_queue_and_pointer_round_trip_through_a_checkpoint(tmp_path):
    args = pretrain_moco.get_args_parser().parse_args(
        ["--batch-size", "8", "--epochs", "1", "--in-chans", "1", "--queue-size", "20", "--bn-splits", "2",
         "--projector-hidden", "16", "--projector-out", "8", "--aug", "simclr"])
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    run = pretrain.in_memory(vars(args), images, "cpu")
    run.out = str(tmp_path)
    method = pretrain_moco.build(args, run)
    start = method.state["queue"].clone()
    pretrain.train(method, run)
    assert int(method.state["queue_pointer"]) == 2 * 8 % 20                       # two steps of 8 keys
    assert not torch.equal(method.state["queue"][:16], start[:16]) and torch.equal(method.state["queue"][16:],
                                                                                   start[16:])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    fresh = pretrain_moco.build(args, pretrain.in_memory(vars(args), images, "cpu"))
    pretrain.restore_state(fresh.state, saved)
    assert torch.equal(fresh.state["queue"], method.state["queue"])
    assert torch.equal(fresh.state["queue_pointer"], method.state["queue_pointer"])


def test_bn_splits_must_cut_the_batch_into_groups_of_two(monkeypatch):
    parser = pretrain_moco.get_args_parser()
    pretrain_moco.check(parser.parse_args(["--batch-size", "16", "--bn-splits", "8"]))
    pretrain_moco.check(parser.parse_args(["--batch-size", "16", "--bn-splits", "8", "--sync-bn"]))  # one process
    for flags in (["--batch-size", "12", "--bn-splits", "8"], ["--batch-size", "8", "--bn-splits", "8"]):
        with pytest.raises(UserError, match="--bn-splits"):
            pretrain_moco.check(parser.parse_args(flags))
    # under torchrun: each process's rows are whole groups, or --sync-bn makes the batch one group
    monkeypatch.setenv("WORLD_SIZE", "4")
    pretrain_moco.check(parser.parse_args(["--batch-size", "16", "--bn-splits", "8"]))
    pretrain_moco.check(parser.parse_args(["--batch-size", "16", "--bn-splits", "1", "--sync-bn"]))
    for flags in (["--bn-splits", "2"], ["--bn-splits", "8", "--sync-bn"]):
        with pytest.raises(UserError, match="--bn-splits"):
            pretrain_moco.check(parser.parse_args(["--batch-size", "16", *flags]))


@pytest.mark.parametrize("name,batch,queue,momentum", [("cpu_moco", 64, 4096, 0.99), ("moco_v2", 256, 65536, 0.999)])
def test_configs_parse(name, batch, queue, momentum):
    args = cli.parse_args(pretrain_moco.get_args_parser(), ["--config", f"{REPO}/configs/{name}.yaml"])
    assert (args.batch_size, args.queue_size, args.ema, args.temperature) == (batch, queue, momentum, 0.2)
    assert args.optimizer == "sgd" and args.lr_schedule == "cosine"
    pretrain_moco.check(args)
