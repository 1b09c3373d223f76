"""common/pretrain.py: the loop's pieces."""
import torch

from common import pretrain


def test_start_epoch_draws_the_same_permutation_again_when_resuming_mid_epoch():
    gen = torch.Generator().manual_seed(0)
    order, epoch_start, first, losses = pretrain.start_epoch(10, gen)
    assert first == 0 and losses == [] and sorted(order.tolist()) == list(range(10))
    torch.rand(3, generator=gen)                                   # the epoch's augmentations draw on
    now = gen.get_state()
    resume = {"step_in_epoch": 3, "epoch_start": epoch_start, "losses": torch.tensor([4.0, 3.0, 2.0])}
    order2, epoch_start2, first2, losses2 = pretrain.start_epoch(10, gen, resume)
    assert torch.equal(order2, order) and torch.equal(epoch_start2, epoch_start)
    assert first2 == 3 and torch.equal(torch.stack(losses2), resume["losses"])
    assert torch.equal(gen.get_state(), now)                       # left where the checkpoint left it
    # at an epoch boundary the next permutation is drawn from the generator itself
    order3, epoch_start3, first3, _ = pretrain.start_epoch(10, gen, {"step_in_epoch": 0})
    assert first3 == 0 and torch.equal(epoch_start3, now) and not torch.equal(gen.get_state(), now)
