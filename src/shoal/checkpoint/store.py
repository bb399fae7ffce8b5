"""Checkpoints on disk: each one a directory that is either whole or absent.

A checkpoint of step N is ``D/step-000000N/`` holding ``state.pt`` (tensors and plain
containers, written with ``torch.save``) and ``meta.json`` (what the state is for, and the
SHA-256 and size of every file). It is written under a temporary name, every file and the
directory are fsynced, and only then is it renamed into place: a crash leaves either the
previous checkpoints or the new one, never half of one. Loading verifies the checksums and
reads the state with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore", "FORMAT_VERSION", "describe_file",
           "fsync_directory", "write_meta"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d{9})$")
_TEMPORARY_PREFIX = ".partial-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One complete checkpoint directory and its metadata."""

    path: Path
    meta: dict

    @staticmethod
    def is_checkpoint(path: str | os.PathLike) -> bool:
        """Is ``path`` one checkpoint's directory (rather than a root holding several)?"""
        return (Path(path) / META_FILE).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """The checkpoint in directory ``path`` (its files are verified when loaded)."""
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path / META_FILE}: cannot be read: {error}") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("step"), int)
                and isinstance(meta.get("files", {}), dict)):
            raise CheckpointError(f"{path / META_FILE}: not a shoal checkpoint's metadata")
        return cls(path, meta)

    @property
    def step(self) -> int:
        """Committed steps it holds: training resumes at this step."""
        return int(self.meta["step"])

    def verify(self) -> None:
        """Raise :class:`CheckpointError` unless every file has its recorded size and SHA-256."""
        for name, expected in self.meta.get("files", {}).items():
            path = self.path / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(f"{path}: {size} bytes, expected {expected['bytes']} (truncated?)")
            if _sha256(path) != expected["sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch (corrupted)")

    def load_state(self) -> dict:
        """The saved state (checksums verified first); tensors and plain containers only."""
        self.verify()
        path = self.path / STATE_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a bad archive
            raise CheckpointError(f"{path}: cannot be read: {error}") from error


class CheckpointStore:
    """The checkpoints of one job in directory ``root``."""

    def __init__(self, root: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, state: dict, meta: dict) -> Checkpoint:
        """Write the checkpoint of ``step`` atomically; returns it once it is durable."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.temporary_directory(step)
        try:
            files = {STATE_FILE: _write_durably(temporary / STATE_FILE, lambda f: torch.save(state, f))}
            meta = write_meta(temporary, {**meta, "step": step, "files": files})
            fsync_directory(temporary)
            return self.publish(temporary, step, meta)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def temporary_directory(self, step: int) -> Path:
        """A new directory to write the checkpoint of ``step`` in, invisible to readers."""
        path = self.root / f"{_TEMPORARY_PREFIX}step-{step:09d}-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        return path

    def publish(self, temporary: Path, step: int, meta: dict | None = None) -> Checkpoint:
        """Rename a complete, fsynced temporary directory into place; prune old checkpoints."""
        final = self.root / f"step-{step:09d}"
        if final.exists():  # the same step saved again (a resumed job): the new copy wins
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_directory(self.root)
        self._prune()
        return Checkpoint(final, meta) if meta is not None else Checkpoint.open(final)

    def checkpoints(self, warn: Callable[[str], None] = log.warning) -> list[Checkpoint]:
        """Complete checkpoints, newest first. Their files are not verified yet."""
        found = []
        for path in self._step_directories():
            try:
                found.append(Checkpoint.open(path))
            except CheckpointError as error:
                warn(f"skipping a bad checkpoint: {error}")
        return found

    def latest_good(self, *, load: bool = True,
                    warn: Callable[[str], None] = log.warning) -> tuple[Checkpoint, dict | None] | None:
        """The newest checkpoint whose files verify, and its state (``load``); older ones are
        fallbacks. ``warn`` hears of every checkpoint skipped, with the file and the reason.
        ``None`` if there is no good one.
        """
        for checkpoint in self.checkpoints(warn):
            try:
                if not load:
                    checkpoint.verify()
                    return checkpoint, None
                return checkpoint, checkpoint.load_state()
            except CheckpointError as error:
                warn(f"skipping a bad checkpoint: {error}")
        return None

    def remove_partial(self) -> None:
        """Delete what writers that died mid-save left (call only when no writer runs)."""
        for path in self.root.glob(f"{_TEMPORARY_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def _step_directories(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return iter(())
        named = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return iter(sorted(named, key=lambda p: p.name, reverse=True))

    def _prune(self) -> None:
        for old in list(self._step_directories())[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)


def write_meta(directory: Path, meta: dict) -> dict:
    """Write ``meta.json`` (with the format version and the time) durably; returns it."""
    meta = {**meta, "format": FORMAT_VERSION, "saved_at": time.time()}
    _write_durably(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def describe_file(path: Path) -> dict:
    """Size and SHA-256 of a file already written, after an fsync of it."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_durably(path: Path, write) -> dict:
    """Write, fsync and describe one file (its size and SHA-256, hashed as it is written)."""
    with open(path, "wb") as raw:
        hashing = _HashingWriter(raw)
        write(hashing)
        raw.flush()
        os.fsync(raw.fileno())
    return {"bytes": hashing.size, "sha256": hashing.digest.hexdigest()}


class _HashingWriter:
    """A binary file object that hashes what passes through (no second read of the file)."""

    def __init__(self, raw):
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
