"""``int8``: each value as a signed byte with one fp32 scale per chunk, error feedback.

int8 sums overflow, so the member that sums a chunk decodes the encodings and adds them in
fp32 (``Compressor._reduce_scatter_gather``): each worker hands collectives n + 4N bytes
instead of 4n (3.99x fewer).
"""

from __future__ import annotations

import torch

from shoal.compression.api import Compressor, register

__all__ = ["Int8"]


@register
class Int8(Compressor):
    name = "int8"
    error_feedback = True

    def _encode(self, tensor, key):
        scale = tensor.abs().max().float().clamp_min(1e-30) / 127.0
        values = torch.round(tensor / scale).clamp_(-127, 127).to(torch.int8)
        return [values, scale.reshape(1)]

    def _decode(self, encoded, like):
        values, scale = encoded
        return values.to(like.dtype) * scale.to(like.dtype)
