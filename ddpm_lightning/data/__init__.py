"""LightningDataModules. Every one yields (image in [-1, 1], label) batches."""

from ddpm_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
