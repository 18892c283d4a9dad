"""What every image DataModule shares: the in-memory cache, the random flip, the loader options.

A concrete DataModule only says how to read one split, either as uint8 tensors already in memory
(CIFAR-10) or as a list of image files and a decode function (CelebA, image folders). The [-1, 1]
scaling is `images.to_model_range`, applied once to a float cache or per example without one.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ddpm_lightning.images import to_model_range
from ddpm_lightning.seeds import step_seed

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "float", "uint8", "none")


def default_num_workers() -> int:
    """Loader processes when data.num_workers is null: the cores this process may use, less one for the
    training loop, at most 8 (1 on a 2-core laptop, 8 on a GPU node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


class BadImage(ValueError):
    """An image file that cannot be used; the message names the file."""


def decode_image(path: Path, mode: str, transform: Callable[[Image.Image], Image.Image]) -> Tensor:
    """Read `path`, convert to `mode` ("RGB" or "L"), apply `transform`; uint8 [C, H, W]."""
    try:
        with Image.open(path) as im:
            im = transform(im.convert(mode))
    except BadImage as e:  # raised by the transform (e.g. too small), which does not know the file
        raise BadImage(f"{path}: {e}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


@dataclass
class ImageFiles:
    """One split as files: paths, labels and the decode (crop / resize) applied to each."""

    paths: list[Path]
    labels: list[int]
    mode: str
    transform: Callable[[Image.Image], Image.Image]

    def decode(self, i: int) -> Tensor:
        return decode_image(self.paths[i], self.mode, self.transform)


class _DecodeAll(Dataset):
    """Index -> (index, image or error message), for decoding a split in loader workers."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.files.decode(i)
        except BadImage as e:
            return i, str(e)


class InMemoryImages(Dataset):
    """Decoded images [N, C, H, W], uint8 or float in [-1, 1], and labels [N] -> (float image, label)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        return (to_model_range(x) if x.dtype == torch.uint8 else x), self.labels[i]


class FileImages(Dataset):
    """Images decoded from their files at every access (no cache) -> (float image, label).

    A file that fails to decode (e.g. truncated after a readable header) is reported then, by the data module's
    policy: `skip_key` None raises BadImage naming the file; with `skip_key` (the config key that chose "skip") the
    next readable image takes its place, with a warning and a count (`skipped`, per process), so batches keep
    their size and training goes on."""

    def __init__(self, files: ImageFiles, skip_key: str | None = None, error_hint: str = ""):
        self.files, self.skip_key, self.error_hint = files, skip_key, error_hint
        self.labels = torch.tensor(files.labels, dtype=torch.long)
        self.bad: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        for j in (i + k for k in range(n)):
            j %= n
            if j in self.bad:
                continue
            try:
                return to_model_range(self.files.decode(j)), self.labels[j]
            except BadImage as e:
                if self.skip_key is None:
                    raise BadImage(f"{e}{self.error_hint}") from None
                self.bad.add(j)
                warn_skipped([str(e)], self.skip_key, total=len(self.bad))
        raise BadImage(f"none of the {n} images could be decoded")


def random_flip(x: Tensor, generator: torch.Generator | None = None, world: int = 1, rank: int = 0) -> Tensor:
    """Mirror each image of [B, C, H, W] left-right with probability 1/2 (Ho et al. 2020 App. B). The coin flips
    are drawn for the global batch of `world` ranks and this rank takes its slice, as the training noise is."""
    n = x.shape[0]
    flip = (torch.rand(world * n, generator=generator) < 0.5)[rank * n : (rank + 1) * n]
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bilinear with antialiasing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """Base of the image DataModules: yields (image in [-1, 1], label) batches; label -1 where there are
    no classes. Subclasses set `channels` and `num_classes` and implement `read_split`.

    cache: "float" decodes every split once and converts it once to float in [-1, 1] (4 bytes a value);
    "uint8" keeps the decoded uint8 images (1 byte a value; converted per example); "none" decodes files
    at every access; "auto" takes the first of float, uint8, none that fits in cache_max_gb.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        batch_size: int = 128,
        random_flip: bool = True,
        cache: str = "auto",
        cache_max_gb: float = 4.0,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be positive")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if cache not in CACHE_MODES:
            raise ValueError(f"data.cache={cache!r} must be one of {', '.join(CACHE_MODES)}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 (or null for one per spare core)")
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.random_flip, self.cache, self.cache_max_gb = random_flip, cache, cache_max_gb
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    num_classes: int | None = None  # set by a subclass whose images have class labels

    # What a subclass provides ---------------------------------------------------------------------
    def read_split(self, split: str) -> tuple[Tensor, Tensor] | ImageFiles:
        """split "train" or "val": (uint8 images [N, C, H, W], labels [N]) or the split's image files."""
        raise NotImplementedError

    def check_files(self, files: ImageFiles) -> ImageFiles:
        """Drop or report unusable files before training when no cache decodes them all (override)."""
        return files

    def file_images(self, files: ImageFiles) -> FileImages:
        """The uncached dataset of `files`, with this module's bad-image policy (override): an error by default."""
        return FileImages(files)

    def on_bad_images(self, errors: list[str]) -> None:
        """Bad images found while decoding: an error naming them (override to warn and skip instead)."""
        raise BadImage(f"{len(errors)} unusable image(s):\n  " + "\n  ".join(errors[:20]))

    # Shared ---------------------------------------------------------------------------------------
    def _cache_mode(self, n: int) -> str:
        if self.cache != "auto":
            return self.cache
        values = n * self.channels * self.image_size**2
        for mode, nbytes in (("float", 4), ("uint8", 1)):
            if values * nbytes <= self.cache_max_gb * 2**30:
                return mode
        return "none"

    def _decode_all(self, files: ImageFiles) -> tuple[Tensor, Tensor]:
        """Decode every file once (in loader workers), reporting unusable ones via on_bad_images."""
        loader = DataLoader(_DecodeAll(files), batch_size=64, num_workers=self.num_workers, collate_fn=list)
        n = len(files.paths)
        images = torch.empty(n, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        ok, errors = torch.zeros(n, dtype=torch.bool), []
        for batch in loader:
            for i, x in batch:
                if isinstance(x, str):
                    errors.append(x)
                else:
                    images[i], ok[i] = x, True
        if errors:
            self.on_bad_images(errors)
        if not ok.any():
            raise BadImage(f"none of the {n} images could be decoded")
        labels = torch.tensor(files.labels, dtype=torch.long)
        return (images, labels) if ok.all() else (images[ok], labels[ok])

    def _dataset(self, split: str) -> Dataset:
        source = self.read_split(split)
        n = len(source.paths) if isinstance(source, ImageFiles) else len(source[0])
        if n == 0:  # e.g. an image folder with val_fraction=0: no validation
            empty = torch.empty(0, self.channels, self.image_size, self.image_size)
            return InMemoryImages(empty, torch.empty(0, dtype=torch.long))
        mode = self._cache_mode(n)
        if isinstance(source, ImageFiles):
            if mode == "none":
                return self.file_images(self.check_files(source))
            images, labels = self._decode_all(source)
        else:
            images, labels = source
            images = resize_uint8(images, self.image_size)
        if mode == "float":
            images = to_model_range(images)  # once, not per epoch
        log.info("data: %s split of %d images cached in memory as %s", split, len(images), images.dtype)
        return InMemoryImages(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._dataset("train")
        self.val_set = self._dataset("val")
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training images"
            )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # The training loader is stateful: its position and shuffling RNG go into the checkpoint, so a resumed
        # run sees the same batches. Under DDP its order is DistributedSampler's, a function of (seed, epoch)
        # alone (each rank its own shard, reshuffled every epoch); it is given here because Lightning would
        # otherwise wrap the loader's own (torchdata) sampler and shuffle twice.
        trainer, sampler = getattr(self, "trainer", None), None
        if train and trainer is not None and (trainer.world_size > 1 or torch.distributed.is_initialized()):
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=True)
        return (StatefulDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The random flip of training batches (`random_flip`), done here rather than in the loader so that it is
        a function of the step: with the module's `seed`, the coin flips of a batch come from a generator seeded
        with (seed, epoch, batch index), the key of the training noise (DiffusionModule.on_train_batch_start), so
        a resumed run flips exactly as the uninterrupted one; without a seed, from the global RNG. `train_set[i]`
        and the validation batches stay unflipped (e.g. for FID references)."""
        trainer = getattr(self, "trainer", None)
        if not self.random_flip or trainer is None or not trainer.training:
            return batch
        seed = getattr(trainer.lightning_module, "hparams", {}).get("seed")
        generator = None
        if seed is not None:
            # the batch index the loop is about to give on_train_batch_start; stream 0 (the ranks' RNGs are 1..world)
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1
            generator = torch.Generator().manual_seed(step_seed(seed, trainer.current_epoch, batch_idx, 0))
        x, *rest = batch
        return [random_flip(x, generator, trainer.world_size, trainer.global_rank), *rest]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


class Downloadable:
    """prepare_data and the files check of a dataset torchvision can fetch. The subclass gives `download`,
    `_missing()` (expected files that are absent), `_not_found(why)` (the error naming them, the URL and
    data.root / data.download) and `_fetch()` (the torchvision download)."""

    def prepare_data(self) -> None:
        """Download on one process per node, when the files are absent and a download is allowed."""
        if not self._missing() or not self.download:
            return
        try:
            self._fetch()
        except Exception as e:  # no network, a proxy, a full disk, a download quota
            raise self._not_found(f"data.download=true but the download failed: {type(e).__name__}: {e}") from e

    def require_files(self) -> None:
        """Stop with the clear error when the files are still missing (before any training)."""
        if self._missing():
            raise self._not_found("data.download=false" if not self.download else "not downloaded")


def missing_files(folder: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if not (folder / n).exists()]


def warn_skipped(errors: list[str], key: str, total: int | None = None) -> None:
    so_far = "" if total is None else f", {total} so far in this process"
    warnings.warn(
        f"skipped {len(errors)} unusable image(s) ({key}=skip{so_far}):\n  " + "\n  ".join(errors[:20]), stacklevel=3
    )
