"""Test-only callbacks that training subprocesses load through Hydra `_target_`s (PYTHONPATH=<repo>:<repo>/tests)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Sends its own process `signum` (SIGINT as a Ctrl-C, SIGTERM as a scheduler) after global step `step`."""

    def __init__(self, step: int, signum: str):
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
