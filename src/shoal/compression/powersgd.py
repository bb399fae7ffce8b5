"""``powersgd``: a rank-r approximation of the gradient (Vogels et al., 2019), error feedback.

The flat tensor is viewed as a near-square n x m matrix M (as torch's batched PowerSGD
hook does). One power iteration with the previous step's Q as warm start: P = M Q is summed
over the group and orthonormalised, then Q = M^T P is summed, and the sum is P Q^T.
Because P and Q are linear in M, summing them sums the approximations. Each worker sends
(n + m) r floats instead of n m; what the approximation misses stays in the residual.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from shoal.compression.api import Compressor, register

__all__ = ["PowerSGD"]


@register
class PowerSGD(Compressor):
    name = "powersgd"
    error_feedback = True

    def sum(self, tensor, key, group=None):
        rows = math.ceil(math.sqrt(tensor.numel()))
        columns = math.ceil(tensor.numel() / rows)
        rank = min(self.powersgd_rank, rows, columns)
        if (rows + columns) * rank >= tensor.numel():  # too small to gain: send it whole
            total = tensor.clone()
            self._all_reduce(total, group)
            return total
        corrected = tensor + self._residual(key, tensor)
        matrix = torch.zeros(rows * columns, dtype=tensor.dtype, device=tensor.device)
        matrix[: tensor.numel()] = corrected.reshape(-1)
        matrix = matrix.reshape(rows, columns)
        query = self._query(key, columns, rank).to(tensor.device)
        p = matrix @ query
        self._all_reduce(p, group)
        p = torch.linalg.qr(p).Q
        q = matrix.T @ p
        self._all_reduce(q, group)
        total = (p @ q.T).reshape(-1)[: tensor.numel()].reshape(tensor.shape)
        # This worker's own approximation is P P^T M (P orthonormal): its residual is the rest.
        own = (p @ (p.T @ matrix)).reshape(-1)[: tensor.numel()].reshape(tensor.shape)
        self._pending[key] = corrected - own
        self._pending[f"{key}/query"] = q / q.norm(dim=0).clamp_min(1e-30)
        return total

    def _query(self, key: str, columns: int, rank: int) -> torch.Tensor:
        query = self._residuals.get(f"{key}/query")
        if query is None or query.shape != (columns, rank):
            # The same start on every member: seeded by the shape, not by the worker.
            generator = torch.Generator().manual_seed(columns * 131 + rank)
            query = torch.randn(columns, rank, generator=generator)
        return query

    def _all_reduce(self, tensor, group):
        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, group=group)
