"""The compressor interface: a SUM all-reduce that sends fewer bytes than fp32.

Each compressor encodes a tensor, exchanges the encoding over a process group and returns
the decoded sum over the group's members. Lossy ones keep *error feedback*: what a step's
encoding dropped is added to the next step's input, so the error does not accumulate.
Residuals change only when the step commits (``commit``); a step that fails and is redone
starts again from the committed residuals (``rollback``), so a redo never counts twice.

Encodings that cannot be summed as they are (int8 overflows, signs do not add) travel in
one of two ways. int8 (and onebit for 1-bit Adam's momentum): a compressed reduce-scatter
followed by an all-gather, as in 1-bit Adam. Member k receives everyone's encoded chunk k,
adds the decoded chunks up in fp32, encodes the sum and all-gathers it, so each member puts
about 2(N-1)/N of one encoding on the wire, as a ring all-reduce does. Both encodings drop
something; both errors go into the member's one residual, so nothing is lost (to float
rounding):

    result + (sum of the members' new residuals) == sum of the members' corrected inputs.

onebit on gradients: every member's encoding is all-gathered and the decoded encodings are
added up, N-1 copies of it on the wire; onebit.py says why it does not re-encode the sum.
"""

from __future__ import annotations

import abc
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["COMPRESSORS", "Compressor", "register"]


class Compressor(abc.ABC):
    name: str = ""
    error_feedback: bool = False
    reduce_scatter: bool = True
    """With error feedback: sum by compressed reduce-scatter and all-gather (about 2(N-1)/N
    of one encoding on the wire); False: all-gather every member's encoding (N-1 of it),
    for encodings whose sum re-encoded loses too much."""

    def __init__(self, *, powersgd_rank: int = 4):
        self.powersgd_rank = powersgd_rank
        self.bytes_sent = 0
        """Payload bytes this worker handed to collectives."""
        self._residuals: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def sum(self, tensor: torch.Tensor, key: str, group: dist.ProcessGroup | None = None,
            parts: list[tuple[str, torch.Size]] | None = None) -> torch.Tensor:
        """The SUM of ``tensor`` over ``group``'s members; ``key`` names it across steps.

        ``parts``: the name and shape of each tensor laid end to end in ``tensor`` (a DDP
        bucket's parameters, a model's). PowerSGD approximates each matrix apart, and a
        residual kept for another layout of the same key is stale."""
        if not self.error_feedback:
            return self._sum(tensor, key, group)
        corrected = self._corrected(tensor, key, parts)
        if not self.reduce_scatter:
            encoded = self._encode(corrected, key)
            self._pending[key] = corrected - self._decode(encoded, corrected)
            return self._all_gather_sum(encoded, corrected, group)
        total, residual = self._reduce_scatter_gather(corrected.reshape(-1), key, group)
        self._pending[key] = residual.reshape(tensor.shape)
        return total.reshape(tensor.shape)

    def _corrected(self, tensor: torch.Tensor, key: str, parts) -> torch.Tensor:
        """``tensor`` plus what this member still owes for ``key``, if laid out as ``parts``."""
        layout = torch.tensor([zlib.crc32(repr(parts).encode())], dtype=torch.int64)
        residual = self._residuals.get(key)
        owed_for = self._residuals.get(f"{key}/layout")  # the layout the residual was kept for
        self._pending[f"{key}/layout"] = layout
        # DDP builds new buckets for each generation and re-orders them after its first
        # step: a residual laid out for other tensors is stale, and would be added to the wrong ones.
        stale = owed_for is None or not torch.equal(owed_for, layout)
        if residual is None or residual.shape != tensor.shape or stale:
            return tensor.clone()
        return tensor + residual

    def commit(self) -> None:
        self._residuals.update(self._pending)
        self._pending.clear()

    def rollback(self) -> None:
        self._pending.clear()

    def state_dict(self) -> dict:
        return {"residuals": dict(self._residuals)}

    def load_state_dict(self, state: dict) -> None:
        self._residuals = dict(state.get("residuals", {}))
        self._pending.clear()

    # -- what each compressor defines -----------------------------------------------------------

    def _sum(self, tensor, key, group) -> torch.Tensor:
        """Compressors without error feedback: the whole exchange."""
        raise NotImplementedError

    def _encode(self, tensor: torch.Tensor, key: str) -> list[torch.Tensor]:
        raise NotImplementedError

    def _decode(self, encoded: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, encoded: list[torch.Tensor], group) -> list[list[torch.Tensor]]:
        """Every member's encoding, this one's too, in rank order: one all-gather of bytes."""
        packed = _pack(encoded)
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        self.bytes_sent += packed.numel()
        dist.all_gather(gathered, packed, group=group)
        return [_unpack(part, encoded) for part in gathered]

    def _all_gather_sum(self, encoded: list[torch.Tensor], like: torch.Tensor, group) -> torch.Tensor:
        """Gather every member's encoding and add up the decoded tensors (fp32, locally)."""
        total = torch.zeros_like(like)
        for member in self._all_gather(encoded, group):
            total += self._decode(member, like)
        return total

    def _reduce_scatter_gather(self, flat: torch.Tensor, key: str,
                               group) -> tuple[torch.Tensor, torch.Tensor]:
        """The SUM of ``flat`` over the group, and what this member's encodings dropped."""
        world, me = dist.get_world_size(group), dist.get_rank(group)
        chunks = F.pad(flat, (0, -flat.numel() % world)).view(world, -1)
        residual = torch.empty_like(chunks)

        # Reduce-scatter: chunk k of every member goes to member k. Its own chunk, member k
        # adds exactly: it never leaves the process.
        encodings = [self._encode(chunk, key) for chunk in chunks]
        for k, (chunk, encoded) in enumerate(zip(chunks, encodings)):
            residual[k] = 0.0 if k == me else chunk - self._decode(encoded, chunk)
        outgoing = [_pack(encoded) for encoded in encodings]
        incoming = [torch.empty_like(packed) for packed in outgoing]
        self.bytes_sent += (world - 1) * outgoing[0].numel()
        dist.all_to_all(incoming, outgoing, group=group)
        layout = encodings[me]
        mine = chunks[me].clone()
        for k, packed in enumerate(incoming):
            if k != me:
                mine += self._decode(_unpack(packed, layout), mine)

        # All-gather the encoded sums. Every member, this one too, decodes the same bytes,
        # so all hold the identical result; what encoding the sum dropped is this member's debt.
        summed = self._encode(mine, key)
        residual[me] = mine - self._decode(summed, mine)
        total = torch.cat([self._decode(member, mine) for member in self._all_gather(summed, group)])
        return total[: flat.numel()], residual.view(-1)[: flat.numel()]


def _pack(encoded: list[torch.Tensor]) -> torch.Tensor:
    """An encoding's tensors as one byte tensor: one collective per phase, not one per part."""
    return torch.cat([part.reshape(-1).view(torch.uint8) for part in encoded])


def _unpack(packed: torch.Tensor, layout: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of ``_pack``, shaped like ``layout`` (an encoding of a chunk of equal size)."""
    parts, offset = [], 0
    for part in layout:
        size = part.numel() * part.element_size()
        # A copy: a view as a wider type needs an offset aligned to its size.
        parts.append(packed[offset: offset + size].clone().view(part.dtype).reshape(part.shape))
        offset += size
    return parts


class NoCompression(Compressor):
    name = "none"

    def _sum(self, tensor, key, group):
        self.bytes_sent += tensor.numel() * tensor.element_size()
        result = tensor.clone()
        dist.all_reduce(result, group=group)
        return result


COMPRESSORS: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    COMPRESSORS[cls.name] = cls
    return cls


register(NoCompression)
