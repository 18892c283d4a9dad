"""Run plumbing: the checkpoint a run directory resumes from, Lightning's epoch count after such a resume, the
checkpoint saved on Ctrl-C / SIGTERM, the lock that keeps two trainings out of one run directory, and the run's
record (.hydra/, train.log), written only once a training is accepted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def resume_checkpoint(run_dir: str | Path, checkpoint_dirs: Iterable[str | Path] = ()) -> Path | None:
    """The newest checkpoint a run directory already holds: Lightning's SLURM `hpc_ckpt_*.ckpt` (written on
    the requeue signal) or `last.ckpt` in one of `checkpoint_dirs`; None for a fresh directory."""
    candidates = list(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    candidates += [Path(d) / "last.ckpt" for d in checkpoint_dirs]
    candidates = [c for c in candidates if c.is_file()]
    return max(candidates, key=lambda c: c.stat().st_mtime_ns) if candidates else None


def last_checkpoint(checkpoint_dirs: Iterable[str | Path]) -> Path | None:
    """The file `ckpt_path=last` resumes from, as Lightning picks it: the newest `last*.ckpt` in the ModelCheckpoint
    directories; None when there is none (Lightning then starts afresh)."""
    candidates = [p for d in checkpoint_dirs for p in Path(d).glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda c: c.stat().st_mtime_ns) if candidates else None


def hpc_checkpoint(run_dir: str | Path) -> Path | None:
    """The file `ckpt_path=hpc` resumes from, as Lightning picks it: `hpc_ckpt_<highest n>.ckpt` in the run directory."""
    found = [(int(p.stem.rsplit("_", 1)[1]), p) for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return max(found)[1] if found else None


def correct_epoch_after_resume(trainer: Any) -> None:
    """Undo Lightning's double count of the epoch when a run resumes from a checkpoint written on the last batch of
    an epoch (ModelCheckpoint's every_n_train_steps, or an interrupt): its fit loop marks that epoch finished when
    restoring and again once the empty remainder of the epoch has run, so the resumed run would continue at
    epoch e + 2, its per-step seeds (seed, epoch, batch index) and a DistributedSampler's shuffling then differing
    from the uninterrupted run's. Call when training starts (after the loops were restored)."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    if not (fit_loop.restarted_mid_epoch and epoch_loop.restarted_on_train_batch_end and epoch_loop.batch_progress.is_last_batch):
        return
    for progress in (fit_loop.epoch_progress.total, fit_loop.epoch_progress.current):
        progress.processed -= 1
        progress.completed -= 1


class InterruptCheckpoint(Callback):
    """On Ctrl-C (SIGINT) or SIGTERM, finish the training step under way, save `last.ckpt` (through the trainer's
    checkpoint IO: atomically) as ModelCheckpoint would at that step, and stop, so the run resumes exactly. A second
    Ctrl-C stops at once, without saving. (SIGTERM is Lightning's: it stops after the step with a SIGTERMException,
    on which the checkpoint is saved here.) Also saves the final step of a run whose max_steps is not a multiple of
    the checkpoint interval: ModelCheckpoint would write it only when training ends, in a state Lightning resumes
    one epoch too far. A run stopped by SIGTERM exits with status 128 + SIGTERM (Lightning's own exit is 0, which a
    job script takes for a finished training), unless Lightning's SLURM handler requeued it (it wrote an
    `hpc_ckpt_<n>.ckpt` during this run)."""

    def __init__(self) -> None:
        self._interrupted = False
        self._previous: Any = None
        self._hpc_at_start: tuple | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._hpc_at_start = self._hpc_state(trainer)
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._interrupted = False
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # the second Ctrl-C
            raise KeyboardInterrupt
        self._interrupted = True

    def _save(self, trainer: Any, why: str, hint: str = "; run again to resume") -> None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and callback.save_last:
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            # ModelCheckpoint's own record of its last file (restored on resume), so that the resumed run writes
            # last.ckpt again rather than a new last-v1.ckpt next to it
            callback.last_model_path = str(path)
            trainer.save_checkpoint(path, weights_only=False)  # the full state (optimizer, loops), as ModelCheckpoint's
            # and of having written it, so that its on_train_end does not overwrite it with the state after the
            # epoch's end (which Lightning resumes one epoch too far)
            callback._last_checkpoint_saved = str(path)
            rank_zero_info(f"{why}: saved {path} at step {trainer.global_step}{hint}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self._interrupted:
            self._interrupted = False
            self._save(trainer, "Interrupted (Ctrl-C)")
            raise KeyboardInterrupt  # Lightning's graceful shutdown
        callback, step = trainer.checkpoint_callback, trainer.global_step
        every = getattr(callback, "_every_n_train_steps", 0)
        if 0 < trainer.max_steps <= step and not (every and step % every == 0):
            self._save(trainer, "Training ended", "")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            self._save(trainer, "Interrupted (SIGTERM)")
        if isinstance(exception, SIGTERMException) and not self._requeued(trainer):
            exception.code = 128 + signal.SIGTERM  # the exit status of the process: stopped, not finished

    @staticmethod
    def _hpc_state(trainer: Any) -> tuple | None:
        hpc = hpc_checkpoint(trainer.default_root_dir)
        return None if hpc is None else (hpc, hpc.stat().st_mtime_ns)

    def _requeued(self, trainer: Any) -> bool:
        """Lightning's SLURM handler wrote an hpc_ckpt_<n>.ckpt (then requeued the job) since training started."""
        now = self._hpc_state(trainer)
        return now is not None and now != self._hpc_at_start


class RunLock:
    """An exclusive lock on a run directory (`<run>/run.lock`, created with O_EXCL, holding pid, host, start time and
    SLURM job id), so two trainings cannot interleave its checkpoints, grids and config.yaml. A lock whose process is
    gone (same host) is stale and taken over, as is one of the same SLURM job (a requeued job). Taken by global
    rank 0 only (other DDP ranks and nodes run in the lock of their rank 0)."""

    NAME = "run.lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self.held = False

    @staticmethod
    def is_global_zero() -> bool:
        return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def _stale(self, holder: dict) -> bool:
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
            return True  # this job, requeued (its earlier process is gone, maybe on another node)
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def acquire(self) -> RunLock:
        if not self.is_global_zero():
            return self
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}  # being written right now, or garbage: treated as held
                if holder and self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                raise RuntimeError(
                    f"paths.output_dir={self.path.parent} is in use by another training (pid {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')}, started {holder.get('started', '?')}; lock file {self.path}). "
                    f"Wait for it to end, choose another paths.output_dir, or delete {self.path} if that process is gone."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine(), f)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path} (another process keeps replacing it)")

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format


class RunRecord:
    """The run's record: Hydra's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) and the job's log (`train.log`),
    which Hydra would write before the training could be checked (conf/train.yaml turns that off). Log records are
    held in memory from the start and go to the log file, with the `.hydra/` files, only on `accept` (the training
    passed its checks: the lock, the checkpoint it resumes); a refused training leaves an existing run's record as it
    was."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # as composed, before any resolving
        self.held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        self.file: logging.Handler | None = None
        logging.getLogger().addHandler(self.held)

    def accept(self, out: Path) -> None:
        """Write `.hydra/` (under Hydra) and start `<job name>.log` in `out` with the records held so far."""
        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
        name = "train" if hydra_cfg is None else hydra_cfg.job.name
        if hydra_cfg is not None and hydra_cfg.output_subdir is None:  # else Hydra wrote it (a DDP rank > 0's)
            record = out / ".hydra"
            record.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, record / "config.yaml")
            OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")
            OmegaConf.save({"hydra": hydra_cfg}, record / "hydra.yaml")
        self.file = logging.FileHandler(out / f"{name}.log")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.held.setTarget(self.file)
        self.held.flush()
        root = logging.getLogger()
        root.removeHandler(self.held)
        root.addHandler(self.file)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in (self.held, self.file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
