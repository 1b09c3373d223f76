"""common/dist.py in one process (tests/test_ddp.py runs two)."""
import torch

from common import dist


def test_my_rows_split_a_batch_and_all_rows_is_their_inverse_in_one_process():
    batch = torch.arange(8)
    assert torch.equal(dist.my_rows(batch), batch) and dist.all_rows(batch) is batch
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert torch.equal(dist.mean_over_ranks(torch.tensor(3.0)), torch.tensor(3.0))
    assert dist.on_main(lambda x: x + 1, 1) == 2


def test_cpu_sync_batchnorm_keeps_float32_statistics_under_bf16_autocast(monkeypatch):
    """Two ranks holding the same rows (simulated: the all-reduce doubles each sum): the global batch is
    the rows twice, so the output and running statistics are BatchNorm's on that batch, in bf16 autocast
    too, where the convolution before hands it bf16 activations; the statistics stay float32."""
    import copy
    torch.manual_seed(0)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "_sum_over_ranks", lambda x: 2 * x)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    synced = dist.sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(synced[1], dist.CPUSyncBatchNorm)
    x = torch.randn(6, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = synced(x)
        expected = reference(torch.cat([x, x]))[:6]
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=0.02, atol=0.02)
    assert synced[1].running_mean.dtype == synced[1].running_var.dtype == torch.float32
    torch.testing.assert_close(synced[1].running_mean, reference[1].running_mean, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(synced[1].running_var, reference[1].running_var, rtol=1e-2, atol=1e-3)
