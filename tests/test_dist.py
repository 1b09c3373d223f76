"""common/dist.py in one process (tests/test_ddp.py runs two)."""
import torch

from common import dist


def test_my_rows_split_a_batch_and_all_rows_is_their_inverse_in_one_process():
    batch = torch.arange(8)
    assert torch.equal(dist.my_rows(batch), batch) and dist.all_rows(batch) is batch
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert torch.equal(dist.mean_over_ranks(torch.tensor(3.0)), torch.tensor(3.0))
    assert dist.on_main(lambda x: x + 1, 1) == 2
