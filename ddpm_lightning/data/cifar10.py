"""CIFAR-10 (Krizhevsky 2009) from torchvision's `cifar-10-batches-py` files: train split for training,
test split for validation and likelihoods, random horizontal flips (Ho et al. 2020 App. B), labels 0-9."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10

from ddpm_lightning.data.base import Downloadable, ImageDataModule, missing_files


def read_cifar10_batches(folder: Path, names: list[str]) -> tuple[Tensor, Tensor]:
    """The official python pickles (dicts with 'data' [N, 3072] uint8 rows in R, G, B planes and
    'labels') -> uint8 images [N, 3, 32, 32], labels [N]."""
    data, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(entry["labels"])
        except Exception as e:  # truncated download, another file under the same name
            raise ValueError(
                f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); delete {folder} and download "
                f"again ({CIFAR10.url})"
            ) from e
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.long)


class CIFAR10DataModule(Downloadable, ImageDataModule):
    """CIFAR-10 at 32x32 (or resized to data.image_size, antialiased), RGB, 10 classes.

    The files are looked for in `root`/cifar-10-batches-py; when absent and `download` is true they are
    fetched with torchvision (md5-checked); otherwise setup stops with an error saying what to fetch.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        random_flip: bool = True,
        cache: str = "auto",
        cache_max_gb: float = 4.0,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ):
        if channels != 3:
            raise ValueError(f"data.channels={channels}: CIFAR-10 is RGB, set data.channels=3")
        super().__init__(image_size, channels, batch_size, random_flip, cache, cache_max_gb, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.root, self.download = Path(root), download
        self.num_classes = 10

    @property
    def folder(self) -> Path:
        return self.root / CIFAR10.base_folder

    def _missing(self) -> list[str]:
        return missing_files(self.folder, [name for name, _ in CIFAR10.train_list + CIFAR10.test_list])

    def _not_found(self, why: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"CIFAR-10 not found ({why}): expected {', '.join(self._missing())} in {self.folder}.\n"
            f"Fetch it with `python -c \"import torchvision; torchvision.datasets.CIFAR10('{self.root}', download=True)\"` "
            f"or download {CIFAR10.url} and run `tar xzf cifar-10-python.tar.gz -C {self.root}`; "
            f"or set data.root to the directory holding {CIFAR10.base_folder}/ (data.download=true fetches it)."
        )

    def _fetch(self) -> None:
        CIFAR10(str(self.root), train=True, download=True)

    def read_split(self, split: str) -> tuple[Tensor, Tensor]:
        self.require_files()
        names = CIFAR10.train_list if split == "train" else CIFAR10.test_list
        return read_cifar10_batches(self.folder, [name for name, _ in names])
