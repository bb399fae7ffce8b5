"""The compressor interface: a SUM all-reduce that sends fewer bytes than fp32.

Each compressor encodes a tensor, exchanges the encoding over a process group and returns
the decoded sum over the group's members. Lossy ones keep *error feedback*: what a step's
encoding dropped is added to the next step's input, so the error does not accumulate.
Residuals change only when the step commits (``commit``); a step that fails and is redone
starts again from the committed residuals (``rollback``), so a redo never counts twice.
"""

from __future__ import annotations

import abc

import torch
import torch.distributed as dist

__all__ = ["COMPRESSORS", "Compressor", "register"]


class Compressor(abc.ABC):
    name: str = ""
    error_feedback: bool = False

    def __init__(self, *, powersgd_rank: int = 4):
        self.powersgd_rank = powersgd_rank
        self.bytes_sent = 0
        """Payload bytes this worker handed to collectives."""
        self._residuals: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def sum(self, tensor: torch.Tensor, key: str, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """The SUM of ``tensor`` over ``group``'s members; ``key`` names it across steps."""
        if not self.error_feedback:
            return self._sum(tensor, key, group)
        corrected = tensor + self._residual(key, tensor)
        encoded = self._encode(corrected, key)
        self._pending[key] = corrected - self._decode(encoded, corrected)
        return self._exchange(encoded, corrected, group)

    def _residual(self, key: str, like: torch.Tensor) -> torch.Tensor:
        residual = self._residuals.get(key)
        # Buckets are rebuilt when the members change; a residual of another shape is stale.
        if residual is None or residual.shape != like.shape:
            return torch.zeros_like(like)
        return residual

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

    def _exchange(self, encoded: list[torch.Tensor], like: torch.Tensor, group) -> torch.Tensor:
        """Gather every member's encoding and add up the decoded tensors (fp32, locally)."""
        gathered = []
        for part in encoded:
            self.bytes_sent += part.numel() * part.element_size()
            copies = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, part, group=group)
            gathered.append(copies)
        total = torch.zeros_like(like)
        for parts in zip(*gathered):
            total += self._decode(list(parts), like)
        return total


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
