"""The embedded dataset: scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set),
shipped inside scikit-learn, so training needs no download."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ddpm_lightning.images import to_model_range


def load_digits_uint8(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as uint8 images [N, 1, image_size, image_size] and labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # pixel values 0..16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


class DigitsDataModule(L.LightningDataModule):
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
        super().__init__()
        if channels != 1:
            raise ValueError(f"data.channels={channels}: the digits are grayscale, set data.channels=1")
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size} must be at least 8 (the digits are 8x8)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        self.save_hyperparameters()
        self.channels, self.num_classes = 1, 10
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_uint8(self.hparams.image_size)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = int(round(self.hparams.val_fraction * len(images)))
        val, train = order[:n_val], order[n_val:]
        x = to_model_range(images)
        self.train_set = TensorDataset(x[train], labels[train])
        self.val_set = TensorDataset(x[val], labels[val])
        if len(self.train_set) < self.hparams.batch_size:
            raise ValueError(
                f"data.batch_size={self.hparams.batch_size} is larger than the {len(self.train_set)} training digits"
            )

    def train_dataloader(self) -> DataLoader:
        # Stateful: its position and shuffling RNG go into the checkpoint, so a resumed run sees the same batches.
        # Under DDP (any world size) the order is DistributedSampler's, a function of (seed, epoch) alone; given here because
        # Lightning would otherwise wrap the loader's own (torchdata) sampler and shuffle twice.
        trainer, sampler = getattr(self, "trainer", None), None
        if trainer is not None and (trainer.world_size > 1 or torch.distributed.is_initialized()):
            sampler = DistributedSampler(
                self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=True, seed=self.hparams.split_seed,
            )
        return StatefulDataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
