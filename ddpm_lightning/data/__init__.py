"""LightningDataModules. Every image one yields (image in [-1, 1], label) batches and exposes `channels` and
`num_classes` (None where the images have no class labels; their label is then -1); the toy one yields points
in [-1, 1] and exposes `data_shape`."""

from ddpm_lightning.data.celeba import CelebADataModule
from ddpm_lightning.data.cifar10 import CIFAR10DataModule
from ddpm_lightning.data.digits import DigitsDataModule
from ddpm_lightning.data.image_folder import ImageFolderDataModule
from ddpm_lightning.data.toy import ToyDataModule

__all__ = ["CIFAR10DataModule", "CelebADataModule", "DigitsDataModule", "ImageFolderDataModule", "ToyDataModule"]
