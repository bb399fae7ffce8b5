import torch
import pytest

from shoal.data import GlobalBatchSampler, fetch
from torch.utils.data import Dataset, TensorDataset


@pytest.mark.parametrize("size,batch", [(1437, 64), (100, 7), (10, 10), (5, 8)])
def test_every_sample_once_per_epoch(size, batch):
    sampler = GlobalBatchSampler(size, batch, seed=3)
    for epoch in range(3):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        seen = torch.cat([sampler.global_indices(s) for s in steps])
        assert sorted(seen.tolist()) == list(range(size))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
def test_shares_partition_the_global_batch(world):
    sampler = GlobalBatchSampler(1437, 64, seed=0)
    for step in (0, 5, 22, 23):  # 22 is the short last step of epoch 0
        shares = [sampler.local_indices(step, rank, world) for rank in range(world)]
        assert torch.equal(torch.cat(shares), sampler.global_indices(step))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1


def test_epochs_are_shuffled_differently_and_seeded():
    a, b = GlobalBatchSampler(100, 10, seed=1), GlobalBatchSampler(100, 10, seed=1)
    assert torch.equal(a.global_indices(0), b.global_indices(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), GlobalBatchSampler(100, 10, seed=2).permutation(0))


class _Squares(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([i * i])


def test_fetch_tensor_and_map_datasets():
    data = TensorDataset(torch.arange(10), torch.arange(10) * 2)
    x, y = fetch(data, torch.tensor([3, 1]))
    assert x.tolist() == [3, 1] and y.tolist() == [6, 2]
    assert fetch(_Squares(), torch.tensor([2, 3])).tolist() == [[4], [9]]
