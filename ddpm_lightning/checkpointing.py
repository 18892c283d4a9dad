"""Reliability: crash-safe checkpoint files, the checkpoint a run directory resumes from, per-step seeds."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to its target, fsyncs it and renames it over the target,
    so a process killed mid-write leaves the previous checkpoint intact and readable.

    Lightning's own local save stages the bytes in a file under the system temp directory and moves it; where
    that directory is on another file system than the run directory (node-local /tmp, shared run directory:
    the usual cluster layout) the move is a copy into the target, which a kill leaves truncated.
    Paths with a protocol (s3://, gs://, ...) go through Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never a mix
        finally:
            tmp.unlink(missing_ok=True)
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def resume_checkpoint(run_dir: str | Path, checkpoint_dirs: Iterable[str | Path] = ()) -> Path | None:
    """The newest checkpoint a run directory already holds: Lightning's SLURM `hpc_ckpt_*.ckpt` (written on
    the requeue signal) or `last.ckpt` in one of `checkpoint_dirs`; None for a fresh directory."""
    candidates = list(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    candidates += [Path(d) / "last.ckpt" for d in checkpoint_dirs]
    candidates = [c for c in candidates if c.is_file()]
    return max(candidates, key=lambda c: c.stat().st_mtime_ns) if candidates else None


def step_seed(*keys: int) -> int:
    """A 63-bit seed mixing integer keys (e.g. run seed, epoch, batch index, rank) through numpy's SeedSequence,
    so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))
