"""``powersgd``: a rank-r approximation of each gradient matrix (Vogels et al., 2019), error feedback.

Each tensor laid end to end in the summed buffer (``parts``: a DDP bucket's parameters, a
model's parameters) with two or more dimensions is seen as a matrix M of its first
dimension by the rest, as in the paper and torch's ``powerSGD_hook``. One power iteration
with the previous step's Q as warm start: P = M Q is summed over the group and
orthonormalised, then Q = M^T P is summed, and the sum is P Q^T. Because P and Q are linear
in M, summing them sums the approximations. Each worker sends (n + m) r floats per matrix
instead of n m; vectors (biases, norms) and matrices too small to gain are summed whole,
in the same all-reduce as the P's. What the approximation misses stays in the residual.

Without ``parts`` the buffer is one near-square matrix (torch's ``batched_powerSGD_hook``):
fewer bytes, but a rank-r view of unrelated parameters cut across their rows, which on
charlm stalled where the per-matrix form did not (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shoal.compression.api import Compressor, register

__all__ = ["PowerSGD"]


@dataclass(slots=True)
class _Matrix:
    index: int
    start: int
    rows: int
    columns: int
    rank: int


@register
class PowerSGD(Compressor):
    name = "powersgd"
    error_feedback = True

    def sum(self, tensor, key, group=None, parts=None):
        flat = tensor.reshape(-1)
        shapes = None if parts is None else [shape for _, shape in parts]
        matrices, whole = self._plan(flat.numel(), shapes)
        if not matrices:  # nothing gains from compression: send it whole
            total = flat.clone()
            self._all_reduce(total, group)
            return total.reshape(tensor.shape)
        corrected = self._corrected(flat, key, parts)
        views = [corrected[m.start: m.start + m.rows * m.columns].view(m.rows, m.columns)
                 for m in matrices]
        summed_whole, ps, qs = self._power_iteration(key, matrices, views, corrected, whole, group)

        total = torch.empty_like(corrected)
        residual = torch.zeros_like(corrected)  # the parts sent whole owe nothing
        for (start, end), part in zip(whole, summed_whole.split([end - start for start, end in whole])):
            total[start:end] = part
        for m, view, p, q in zip(matrices, views, ps, qs):
            span = slice(m.start, m.start + m.rows * m.columns)
            total[span] = (p @ q.T).reshape(-1)
            # This worker's own approximation is P P^T M (P orthonormal): its residual is the rest.
            residual[span] = (view - p @ (p.T @ view)).reshape(-1)
            self._pending[f"{key}/query{m.index}"] = q / q.norm(dim=0).clamp_min(1e-30)
        self._pending[key] = residual
        return total.reshape(tensor.shape)

    def _power_iteration(self, key, matrices, views, corrected, whole, group):
        """The summed parts sent whole, and each matrix's orthonormal P and summed Q. The
        parts sent whole travel in the P's all-reduce: two collectives in all."""
        uncompressed = torch.cat([corrected[start:end] for start, end in whole]) if whole else corrected[:0]
        ps = [view @ self._query(key, m).to(view.device) for m, view in zip(matrices, views)]
        first = torch.cat([uncompressed, *(p.reshape(-1) for p in ps)])
        self._all_reduce(first, group)
        summed_whole, summed_ps = first[: uncompressed.numel()], first[uncompressed.numel():]
        ps = [torch.linalg.qr(p.view(m.rows, m.rank)).Q
              for m, p in zip(matrices, summed_ps.split([m.rows * m.rank for m in matrices]))]
        qs = torch.cat([(view.T @ p).reshape(-1) for view, p in zip(views, ps)])
        self._all_reduce(qs, group)
        qs = [q.view(m.columns, m.rank)
              for m, q in zip(matrices, qs.split([m.columns * m.rank for m in matrices]))]
        return summed_whole, ps, qs

    def _plan(self, numel: int, shapes) -> tuple[list[_Matrix], list[tuple[int, int]]]:
        """The matrices to approximate and the (start, end) spans to send whole."""
        if shapes is not None and sum(math.prod(shape) for shape in shapes) != numel:
            raise ValueError(f"powersgd: parts of {sum(math.prod(s) for s in shapes)} values "
                             f"laid out in a buffer of {numel}")
        if shapes is None:
            columns = math.ceil(math.sqrt(numel))
            rows, left_over = divmod(numel, columns)
            shapes = [(rows, columns), (left_over,)]  # near-square, and the few values left
        matrices, whole, start = [], [], 0
        for index, shape in enumerate(shapes):
            size = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 0
            columns = size // rows if rows else 0
            rank = min(self.powersgd_rank, rows, columns)
            if rank and (rows + columns) * rank < size:
                matrices.append(_Matrix(index, start, rows, columns, rank))
            elif size:
                whole.append((start, start + size))
            start += size
        return matrices, whole

    def _query(self, key: str, matrix: _Matrix) -> torch.Tensor:
        query = self._residuals.get(f"{key}/query{matrix.index}")
        if query is None or query.shape != (matrix.columns, matrix.rank):
            # The same start on every member: seeded by the shape, not by the worker.
            generator = torch.Generator().manual_seed(matrix.columns * 131 + matrix.rank)
            query = torch.randn(matrix.columns, matrix.rank, generator=generator)
        return query

    def _all_reduce(self, tensor, group):
        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, group=group)
