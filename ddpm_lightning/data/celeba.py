"""CelebA (Liu et al. 2015) aligned faces in torchvision's layout, preprocessed as in the DDIM CelebA 64x64
setting (Song, Meng & Ermon 2021; ermongroup/ddim datasets/__init__.py): a fixed 128x128 crop around
the face (centre x = 89, y = 121 of the 178x218 aligned image, i.e. rows 57-184, columns 25-152),
resized to 64x64, random horizontal flips for training. Official train / valid / test partition."""

from __future__ import annotations

from pathlib import Path

import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import CelebA
from torchvision.transforms import InterpolationMode

from ddpm_lightning.data.base import (
    BadImage,
    Downloadable,
    ImageDataModule,
    ImageFiles,
    missing_files,
)

ALIGNED_SIZE = (178, 218)  # width, height of img_align_celeba
CROP_TOP, CROP_LEFT, CROP_SIZE = 121 - 64, 89 - 64, 128
SPLITS = ("train", "valid", "test")
URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


class _CelebAFiles(CelebA):
    """torchvision's CelebA, accepting files that exist (their md5 sums are checked when downloaded)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        names = [name for _, _, name in self.file_list if not name.endswith(".zip")]
        return (folder / "img_align_celeba").is_dir() and not missing_files(folder, names)


class CelebACrop:
    """Aligned CelebA image -> the DDIM 128x128 face crop resized to `size` (bilinear, antialiased)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, im: Image.Image) -> Image.Image:
        if im.size != ALIGNED_SIZE:
            raise BadImage(f"{im.size[0]}x{im.size[1]} pixels, expected an aligned CelebA image of 178x218")
        im = TF.crop(im, CROP_TOP, CROP_LEFT, CROP_SIZE, CROP_SIZE)
        return TF.resize(im, [self.size, self.size], interpolation=InterpolationMode.BILINEAR, antialias=True)


class CelebADataModule(Downloadable, ImageDataModule):
    """CelebA 64x64 faces, RGB, no class labels (label -1). Files in `root`/celeba as torchvision lays
    them out; downloaded with torchvision (Google Drive, needs gdown) when absent and `download` is true."""

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        val_split: str = "test",
        image_size: int = 64,
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
            raise ValueError(f"data.channels={channels}: CelebA is RGB, set data.channels=3")
        if val_split not in ("valid", "test"):
            raise ValueError(f"data.val_split={val_split!r} must be 'valid' or 'test' (official partition)")
        if image_size > CROP_SIZE:
            raise ValueError(f"data.image_size={image_size} is larger than the {CROP_SIZE}x{CROP_SIZE} face crop")
        super().__init__(image_size, channels, batch_size, random_flip, cache, cache_max_gb, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.root, self.download, self.val_split = Path(root), download, val_split

    @property
    def folder(self) -> Path:
        return self.root / CelebA.base_folder

    def _missing(self) -> list[str]:
        names = ["img_align_celeba/"] + [name for _, _, name in CelebA.file_list if not name.endswith(".zip")]
        return missing_files(self.folder, names)

    def _not_found(self, why: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"CelebA not found ({why}): expected {', '.join(self._missing())} in {self.folder}.\n"
            f"Fetch them with `pip install gdown && python -c \"import torchvision; torchvision.datasets.CelebA('{self.root}', download=True)\"`, "
            f"or download img_align_celeba.zip and the annotation files (Anno/*.txt, Eval/list_eval_partition.txt) "
            f"from {URL} and unzip the images into {self.folder}/img_align_celeba/; "
            f"or set data.root to the directory holding celeba/ (data.download=true fetches it)."
        )

    def _fetch(self) -> None:
        CelebA(str(self.root), split="train", target_type=[], download=True)

    def read_split(self, split: str) -> ImageFiles:
        self.require_files()
        name = "train" if split == "train" else self.val_split
        ds = _CelebAFiles(str(self.root), split=name, target_type=[])
        paths = [self.folder / "img_align_celeba" / f for f in ds.filename]
        return ImageFiles(paths, [-1] * len(paths), "RGB", CelebACrop(self.image_size))
