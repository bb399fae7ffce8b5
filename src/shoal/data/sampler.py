"""The global-batch sampler: the data position is the committed step, nothing else.

Step ``s`` lies in epoch ``e = s // steps_per_epoch``; it trains on the slice
``[k*B, (k+1)*B)`` (``k = s % steps_per_epoch``) of epoch ``e``'s seeded permutation. The last
step of an epoch takes the remainder, so every sample is used exactly once per epoch. The
slice is split over the current generation's ranks in contiguous shares; because the split
depends only on (step, rank, world size), survivors of a failure re-split the same global
batch and no sample is lost or repeated.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = ["GlobalBatchSampler", "fetch"]


class GlobalBatchSampler:
    def __init__(self, dataset_size: int, global_batch_size: int, seed: int):
        if dataset_size < 1:
            raise ValueError("the training dataset is empty")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(dataset_size / global_batch_size)
        self._cached_epoch = -1
        self._permutation = torch.empty(0, dtype=torch.int64)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.dataset_size, generator=generator)
            self._cached_epoch = epoch
        return self._permutation

    def global_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the whole global batch of ``step``."""
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return self.permutation(self.epoch_of(step))[start : start + self.global_batch_size]

    def samples_in_first(self, steps: int) -> int:
        """How many samples steps 0 .. ``steps`` - 1 use (an epoch's last batch may be short)."""
        epochs, rest = divmod(steps, self.steps_per_epoch)
        return epochs * self.dataset_size + min(rest * self.global_batch_size, self.dataset_size)

    def local_indices(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's contiguous share of the global batch (shares differ by at most one)."""
        return torch.tensor_split(self.global_indices(step), world_size)[rank]


def fetch(dataset: Dataset, indices: torch.Tensor):
    """Collate ``dataset[indices]`` into one batch (tensor datasets are indexed in one go)."""
    if isinstance(dataset, TensorDataset):
        return tuple(tensor[indices] for tensor in dataset.tensors)
    index_list = indices.tolist()
    if hasattr(dataset, "__getitems__"):
        return default_collate(dataset.__getitems__(index_list))
    return default_collate([dataset[i] for i in index_list])
