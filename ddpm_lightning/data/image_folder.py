"""Any directory of images (png / jpg / webp, searched recursively). When the directory holds subfolders
and no images of its own, each first-level subfolder with images is a class (sorted names -> labels
0, 1, ...); otherwise the images are unlabelled (label -1). Images are resized (shorter side) and centre-cropped to image_size."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ddpm_lightning.data.base import (
    BadImage,
    FileImages,
    ImageDataModule,
    ImageFiles,
    warn_skipped,
)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
BAD_IMAGE_POLICIES = ("error", "skip")


class ResizeCenterCrop:
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop size x size. An image
    smaller than `size` is refused rather than upsampled."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, im: Image.Image) -> Image.Image:
        if min(im.size) < self.size:
            raise BadImage(f"{im.size[0]}x{im.size[1]} pixels, smaller than data.image_size={self.size}")
        im = TF.resize(im, self.size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(im, [self.size, self.size])


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


class ImageFolderDataModule(ImageDataModule):
    """Images under `path`, split into train / val with a fixed seed. `on_bad_image`: "error" stops at
    the first setup with the unusable files named; "skip" leaves them out with a warning and a count."""

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 128,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        on_bad_image: str = "error",
        random_flip: bool = True,
        cache: str = "auto",
        cache_max_gb: float = 4.0,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r} must be 'error' or 'skip'")
        super().__init__(image_size, channels, batch_size, random_flip, cache, cache_max_gb, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.path = Path(path)
        self.skipped = 0

    @functools.cached_property
    def index(self) -> tuple[list[Path], list[int], list[str]]:
        """All image files, their labels, and the class names ([] when unlabelled)."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.path={self.path} is not a directory of images")
        top = [p for p in self.path.iterdir() if not p.name.startswith(".")]
        subfolders = sorted(p for p in top if p.is_dir())
        if subfolders and not any(p.is_file() and p.suffix.lower() in EXTENSIONS for p in top):
            per_class = {p.name: find_images(p) for p in subfolders}
            classes = [c for c, files in per_class.items() if files]
            paths = [f for c in classes for f in per_class[c]]
            labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        else:
            paths, classes = find_images(self.path), []
            labels = [-1] * len(paths)
        if not paths:
            raise FileNotFoundError(
                f"data.path={self.path}: no images ({', '.join(EXTENSIONS)}) in it or its subfolders"
            )
        return paths, labels, classes

    @property
    def num_classes(self) -> int | None:
        return len(self.index[2]) or None

    def read_split(self, split: str) -> ImageFiles:
        paths, labels, _ = self.index
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.hparams.split_seed)).tolist()
        n_val = int(round(self.hparams.val_fraction * len(paths)))
        if self.hparams.val_fraction > 0 and len(paths) > 1:
            n_val = max(n_val, 1)
        chosen = sorted(order[:n_val] if split == "val" else order[n_val:])
        mode = "RGB" if self.channels == 3 else "L"
        return ImageFiles([paths[i] for i in chosen], [labels[i] for i in chosen], mode, ResizeCenterCrop(self.image_size))

    def on_bad_images(self, errors: list[str]) -> None:
        if self.hparams.on_bad_image == "skip":
            self.skipped += len(errors)
            warn_skipped(errors, "data.on_bad_image")
            return
        raise BadImage(
            f"{len(errors)} unusable image(s) under data.path={self.path} (fix or remove them, or set "
            f"data.on_bad_image=skip):\n  " + "\n  ".join(errors[:20])
        )

    def file_images(self, files: ImageFiles) -> FileImages:
        """Without a cache, files that break only when decoded (a truncated PNG) meet the same policy mid-training."""
        if self.hparams.on_bad_image == "skip":
            return FileImages(files, skip_key="data.on_bad_image")
        return FileImages(files, error_hint=f" (under data.path={self.path}; fix or remove it, or set data.on_bad_image=skip)")

    def check_files(self, files: ImageFiles) -> ImageFiles:
        """Without a cache: open every file's header (cheap) so that unreadable and too-small images are
        found at setup; the rest of a broken file is reported, naming it, when it is decoded."""
        keep, errors = [], []
        for i, path in enumerate(files.paths):
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception as e:
                errors.append(f"{path}: not a readable image ({type(e).__name__}: {e})")
                continue
            if min(size) < self.image_size:
                errors.append(f"{path}: {size[0]}x{size[1]} pixels, smaller than data.image_size={self.image_size}")
            else:
                keep.append(i)
        if errors:
            self.on_bad_images(errors)
        return ImageFiles([files.paths[i] for i in keep], [files.labels[i] for i in keep], files.mode, files.transform)
