"""Test-only pieces that training subprocesses load through Hydra `_target_`s (PYTHONPATH=<repo>:<repo>/tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.training.callbacks import EMA


class KillAt(L.Callback):
    """SIGKILLs its own process after global step `step`: a crash with no chance to clean up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRankState(L.Callback):
    """At the end of training, saves this rank's per-step losses, raw and EMA weights to `<dirpath>/rank<r>.pt`."""

    def __init__(self, dirpath: str):
        self.dirpath, self.losses = Path(dirpath), []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA)).averaged_module()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {"raw": pl_module.state_dict(), "ema": ema.state_dict(), "losses": self.losses, "world_size": trainer.world_size}
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


class FixedOrderDigits(L.LightningDataModule):
    """Random digit-sized tensors in a fixed order, cut into global batches of `world * batch_size`. A single
    process (`single_process`) takes whole global batches; DDP rank r takes rows [r n, (r + 1) n) of each (run
    with trainer.use_distributed_sampler=false), the slice the training noise is drawn for (DiffusionModule._loss)."""

    def __init__(self, batch_size: int, world: int, single_process: bool, n: int = 256, image_size: int = 8, **_):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand((n, 1, image_size, image_size), generator=g) * 2 - 1
        self.batch_size, self.world, self.single_process, self.channels = batch_size, world, single_process, 1

    def train_dataloader(self) -> DataLoader:
        n, w = self.batch_size, self.world
        if self.single_process:
            return DataLoader(TensorDataset(self.x), batch_size=w * n, shuffle=False, drop_last=True)
        r = self.trainer.global_rank
        assert self.trainer.world_size == w
        rows = self.x.view(-1, w, n, *self.x.shape[1:])[:, r].reshape(-1, *self.x.shape[1:])
        return DataLoader(TensorDataset(rows), batch_size=n, shuffle=False, drop_last=True)


class SlowSteps(L.Callback):
    """Sleeps after every training step, so a test can signal a job while it is mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        import time

        time.sleep(self.seconds)
