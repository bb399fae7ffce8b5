"""``onebit``: the sign of each value, packed 8 to a byte, and one fp32 scale; error feedback.

The scale is the mean magnitude, the value that minimises the squared error of a
sign-only encoding (as in 1-bit SGD / 1-bit Adam). Signs do not add, so chunks are summed
in fp32 by the member that owns them (``Compressor._reduce_scatter_gather``). Each worker
hands collectives n/8 + 4N bytes instead of 4n (about 32x fewer); the residual carries
what the signs dropped to the next step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoal.compression.api import Compressor, register

__all__ = ["OneBit"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@register
class OneBit(Compressor):
    name = "onebit"
    error_feedback = True

    def _encode(self, tensor, key):
        flat = tensor.reshape(-1)
        scale = flat.abs().mean().float().reshape(1)
        positive = F.pad((flat >= 0).to(torch.uint8), (0, (-flat.numel()) % 8))
        packed = (positive.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)
        return [packed, scale]

    def _decode(self, encoded, like):
        packed, scale = encoded
        bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)).ne(0).reshape(-1)[: like.numel()]
        signs = bits.to(like.dtype) * 2 - 1
        return (signs * scale.to(like.dtype)).reshape(like.shape)
