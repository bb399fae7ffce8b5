"""Durable state: atomic checkpoints, background saving, resume checks, export."""

from shoal.checkpoint.identity import check_resumable, job_identity
from shoal.checkpoint.plan import Checkpointing
from shoal.checkpoint.saver import AsyncSaver
from shoal.checkpoint.store import Checkpoint, CheckpointError, CheckpointStore

__all__ = ["AsyncSaver", "Checkpoint", "CheckpointError", "CheckpointStore", "Checkpointing",
           "check_resumable", "job_identity"]
