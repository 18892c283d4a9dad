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

# What a CIFAR-10 python batch is made of besides builtin containers, str, bytes and numbers: numpy arrays
# (their reconstruction, as pickled by numpy 1.x and 2.x) and the bytes codec protocol 2 uses for them.
_BATCH_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("numpy", "dtype"), ("_codecs", "encode"),
})


class BatchUnpickler(pickle.Unpickler):
    """Unpickles data only: builtin containers, numbers, strings, bytes and numpy arrays. Any other global (a class
    or function a pickle names, e.g. in a `__reduce__` that would run code) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One CIFAR-10 python batch as data (`BatchUnpickler`), its arrays of numbers only."""
    with open(path, "rb") as f:
        entry = BatchUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict) or not {"data", "labels"} <= set(entry):
        raise ValueError("not a dict with 'data' and 'labels'")
    if not isinstance(entry["data"], np.ndarray) or entry["data"].dtype.kind not in "iu":
        raise ValueError("'data' is not an array of integers")
    return entry


def read_cifar10_batches(folder: Path, names: list[str]) -> tuple[Tensor, Tensor]:
    """The official python pickles (dicts with 'data' [N, 3072] uint8 rows in R, G, B planes and
    'labels'), read as data (`read_batch`) -> uint8 images [N, 3, 32, 32], labels [N]."""
    data, labels = [], []
    for name in names:
        path = folder / name
        try:
            entry = read_batch(path)
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += [int(y) for y in entry["labels"]]
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} is not a plain CIFAR-10 python batch ({e}), so it was not loaded; "
                             f"delete {folder} and download again ({CIFAR10.url})") from None
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
