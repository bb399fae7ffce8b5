"""``shoal export``: a checkpoint's model as one plain safetensors file.

safetensors because it is the format other tools load without running code (no pickle), it
is what model hubs expect, and its library is small and well kept; writing our own tensor
container would be neither.
"""

from __future__ import annotations

import os
from pathlib import Path

from shoal.checkpoint.store import Checkpoint, CheckpointError, CheckpointStore

__all__ = ["export_model"]


def export_model(source: str | os.PathLike, out: str | os.PathLike, warn=print) -> Checkpoint:
    """Write the model of ``source`` (a checkpoint, or the newest good one of a checkpoint
    directory; whole or sharded) to ``out``; returns the checkpoint exported."""
    from safetensors.torch import save

    from shoal._io import atomic_write

    if Checkpoint.is_checkpoint(source):
        checkpoint = Checkpoint.open(source)
        checkpoint.verify()
    else:
        found = CheckpointStore(source).latest_good(load=False, warn=warn)
        if found is None:
            raise CheckpointError(f"{source}: holds no usable checkpoint (a step-* directory whose files pass their checksums)")
        checkpoint = found[0]
    if checkpoint.meta.get("sharded"):
        from shoal.checkpoint.sharded import full_model_state

        model = full_model_state(checkpoint)
    else:
        model = checkpoint.load_state()["model"]
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in model.items()}
    metadata = {"step": str(checkpoint.step), "task": str(checkpoint.meta.get("task")),
                "source": str(Path(checkpoint.path).resolve())}
    atomic_write(str(out), lambda handle: handle.write(save(tensors, metadata=metadata)))
    return checkpoint
