"""The embedded dataset: scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set),
shipped inside scikit-learn, so training needs no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_lightning.data.base import ImageDataModule


def load_digits_uint8(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as uint8 images [N, 1, image_size, image_size] and labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # pixel values 0..16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


class DigitsDataModule(ImageDataModule):
    """Digits resized to `image_size`, split into train / val with a fixed seed; no flips (digits are not
    mirror-symmetric). Decoded once and held in memory as float tensors in [-1, 1]."""

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        channels: int = 1,
    ):
        if channels != 1:
            raise ValueError(f"data.channels={channels}: the digits are grayscale, set data.channels=1")
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size} must be at least 8 (the digits are 8x8)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
        super().__init__(image_size, channels, batch_size, random_flip=False, cache="float", num_workers=num_workers)
        self.save_hyperparameters()
        self.num_classes = 10

    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_digits_uint8(self.hparams.image_size)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = int(round(self.hparams.val_fraction * len(images)))
        part = order[:n_val] if split == "val" else order[n_val:]
        return images[part], labels[part]
