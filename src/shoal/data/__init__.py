"""Data: which samples each step trains on, derived from the committed step alone."""

from shoal.data.sampler import GlobalBatchSampler, fetch

__all__ = ["GlobalBatchSampler", "fetch"]
