"""Test-only pieces that training subprocesses load through Hydra `_target_`s (PYTHONPATH=<repo>:<repo>/tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import EMA


class KillAt(L.Callback):
    """SIGKILLs its own process after global step `step`: a crash with no chance to clean up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRankState(L.Callback):
    """At the end of training, saves this rank's raw and EMA weights to `<dirpath>/rank<r>.pt`."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA)).averaged_module()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {"raw": pl_module.state_dict(), "ema": ema.state_dict(), "world_size": trainer.world_size}
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


class FixedOrderDigits(L.LightningDataModule):
    """Digit-like tensors in a fixed order, arranged so that a single process with batch `world * batch_size`
    sees in each global batch exactly the examples that `world` DDP ranks with `batch_size` each see (Lightning's
    DistributedSampler gives rank r the examples r, r + world, ...; rank r's block sits at [r n, (r + 1) n))."""

    def __init__(self, batch_size: int, world: int, single_process: bool, n: int = 256, image_size: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.rand((n, 1, image_size, image_size), generator=g) * 2 - 1
        if single_process:  # global batch k = [rank 0's batch k, rank 1's batch k, ...]
            x = x.view(-1, batch_size, world, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
        self.x, self.channels = x, 1
        self.batch_size = batch_size * world if single_process else batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x), batch_size=self.batch_size, shuffle=False, drop_last=True)


class SlowSteps(L.Callback):
    """Sleeps after every training step, so a test can signal a job while it is mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        import time

        time.sleep(self.seconds)
