"""Checkpoint and weight files as data: read with `weights_only` loading (their stored configs checked by
`ddpm_lightning.registry` before anything is built from them), and written crash-safely. Building models from
them is `ddpm_lightning.loading`."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddpm_lightning import registry


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_file(path: str | Path, key: str, map_location: Any = "cpu", what: str = "checkpoint", mmap: bool = False) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, so a file whose pickle would run code or
    build arbitrary objects is refused. `key` is the config key that named the file (for the error messages);
    `mmap`: tensors mapped from the file, read when used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (check {key})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
        if "global" not in detail.lower():  # not a pickle at all (a truncated or foreign file)
            raise ValueError(f"{path} ({key}) is not a readable PyTorch {what} ({detail.splitlines()[0]})") from None
        raise ValueError(
            f"{path} ({key}) is not a plain {what}: it holds Python objects other than tensors and containers, "
            f"which could run code when loaded, so it was not loaded ({detail.splitlines()[0].split('. Please')[0]})"
        ) from None
    except Exception as e:  # a truncated, corrupt or foreign file
        raise ValueError(f"{path} ({key}) is not a readable PyTorch {what} ({type(e).__name__}: {e})") from None


def read_checkpoint(path: str | Path, map_location: Any = "cpu", key: str = "ckpt_path") -> dict:
    """A ddpm-lightning checkpoint as data: loaded weights_only; its hyper-parameters plain data (no interpolation)
    naming only registered constructors (`registry.check_names`)."""
    ckpt = load_file(path, key, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("hyper_parameters"), dict) or "net" not in ckpt["hyper_parameters"]:
        raise ValueError(f"{path} is not a ddpm-lightning checkpoint (no hyper_parameters.net; check {key})")
    registry.check_names(ckpt["hyper_parameters"], f"checkpoint {path} ({key})", "hyper_parameters")
    return ckpt


def write_error(path: str | Path, error: BaseException, note: str = "") -> OSError:
    """A failed write of `path` (a full disk, a quota) as one error naming the file, the cause and the free space."""
    if isinstance(error, OSError) and error.strerror:
        cause = error.strerror
    else:
        lines = str(error).strip().splitlines()
        cause = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free on its file system"
    except OSError:
        free = ""
    return OSError(f"could not write {path} ({cause}){free}{note}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to its target, fsyncs it and renames it over the target,
    so a process killed mid-write leaves the previous checkpoint intact and readable.

    Lightning's own local save stages the bytes in a file under the system temp directory and moves it; where
    that directory is on another file system than the run directory (node-local /tmp, shared run directory:
    the usual cluster layout) the move is a copy into the target, which a kill leaves truncated.
    Paths with a protocol (s3://, gs://, ...) go through Lightning's writer.

    Reading (resume) goes through `read_checkpoint`: weights_only, stored `_target_`s checked.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location)

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
        except (OSError, RuntimeError) as e:  # a full disk reads "unexpected pos ..." from torch, naming no file
            raise write_error(path, e, "; the previous checkpoint there, if any, is intact") from e
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
