"""Test-only data module that training subprocesses load through a Hydra `_target_` (PYTHONPATH=<repo>:<repo>/tests)."""

from __future__ import annotations

from ddpm_lightning.data import DigitsDataModule


class FlippedDigits(DigitsDataModule):
    """The digits with random horizontal flips on (the real module never flips them: digits are not mirror
    symmetric, which makes every flip visible in the weights)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.random_flip = True
