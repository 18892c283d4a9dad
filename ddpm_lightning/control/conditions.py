"""Conditions of a ControlNet, computed from images in [-1, 1] (conf/control/): `lowres` (super-resolution),
`edges` (an edge map) and `mask` (inpainting). Each operator gives

- `op(x, generator)`: the condition ("hint") of images x [B, C, H, W], shaped [B, hint_channels(C), H, W];
- `adherence(samples, hint)`: per sample, the mean squared difference between the condition and the same
  operator applied to the sample (how well the samples obey their conditions);
- `show(hint, C)`: the condition as a C-channel image in [-1, 1], for condition | sample grids;
- `from_images(images, C)`: the condition from user-supplied condition images (a folder, see `load_folder`).
"""

from __future__ import annotations

from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ddpm_lightning.images import to_model_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class LowRes:
    """Down-sample by `factor` (area average), then up-sample back (nearest): the condition of super-resolution."""

    def __init__(self, factor: int = 2):
        if int(factor) < 2:
            raise ValueError(f"control.factor={factor} must be an integer of at least 2")
        self.factor = int(factor)

    def hint_channels(self, channels: int) -> int:
        return channels

    def down(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"control.factor={self.factor} must divide the image size {tuple(x.shape[-2:])}")
        return F.avg_pool2d(x.float(), self.factor)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return F.interpolate(self.down(x), scale_factor=self.factor, mode="nearest").to(x.dtype)

    def adherence(self, samples: Tensor, hint: Tensor) -> Tensor:
        """MSE between the down-sampled sample and the low-resolution condition."""
        return _mse(self.down(samples), self.down(hint))

    def show(self, hint: Tensor, channels: int) -> Tensor:
        return hint

    def from_images(self, images: Tensor, channels: int, image_size: int) -> Tensor:
        """Low-resolution images of image_size / factor pixels."""
        small = image_size // self.factor
        _check_images(images, (channels, small, small), f"low-resolution images ({channels} channels, {small}x{small})")
        return F.interpolate(images, scale_factor=self.factor, mode="nearest")


class Edges:
    """An edge map of the image's luminance (kornia): `sobel` gradient magnitude or `canny` edges, in [-1, 1]."""

    def __init__(self, kind: str = "sobel", low_threshold: float = 0.1, high_threshold: float = 0.2):
        if kind not in ("sobel", "canny"):
            raise ValueError(f"control.kind={kind!r} must be 'sobel' or 'canny'")
        self.kind, self.low, self.high = kind, low_threshold, high_threshold

    def hint_channels(self, channels: int) -> int:
        return 1

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        gray = (x.float() + 1) / 2
        if gray.shape[1] == 3:
            gray = kornia.color.rgb_to_grayscale(gray)
        if self.kind == "sobel":
            edges = kornia.filters.sobel(gray).clamp(0, 1)
        else:
            edges = kornia.filters.canny(gray, self.low, self.high)[1]
        return (2 * edges - 1).to(x.dtype)

    def adherence(self, samples: Tensor, hint: Tensor) -> Tensor:
        """MSE between the sample's edge map and the condition."""
        return _mse(self(samples), hint)

    def show(self, hint: Tensor, channels: int) -> Tensor:
        return hint.expand(-1, channels, -1, -1)

    def from_images(self, images: Tensor, channels: int, image_size: int) -> Tensor:
        """Grayscale edge maps of image_size pixels (white edges on black)."""
        _check_images(images, (1, image_size, image_size), f"grayscale edge maps ({image_size}x{image_size})")
        return images


class Mask:
    """Inpainting: the image with a random rectangle blanked out (set to 0) plus the mask as a last channel
    (+1 known, -1 to fill in). Each rectangle's sides are drawn uniformly in [min_size, max_size] times the
    image's side, its position uniformly."""

    def __init__(self, min_size: float = 0.25, max_size: float = 0.75):
        if not 0 < min_size <= max_size <= 1:
            raise ValueError(f"control.min_size={min_size}, control.max_size={max_size} must satisfy 0 < min <= max <= 1")
        self.min_size, self.max_size = min_size, max_size

    def hint_channels(self, channels: int) -> int:
        return channels + 1

    def random_masks(self, n: int, size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Known-pixel masks [n, 1, size, size] (1 known, 0 to fill in)."""
        u = torch.rand((4, n), generator=generator, device=generator.device if generator is not None else "cpu").to(device)
        lo, hi = max(1, round(self.min_size * size)), max(1, round(self.max_size * size))
        h, w = (lo + (u[:2] * (hi - lo + 1)).long().clamp(max=hi - lo))
        top, left = (u[2] * (size - h + 1)).long(), (u[3] * (size - w + 1)).long()
        r = torch.arange(size, device=device)
        rows = (r[None] >= top[:, None]) & (r[None] < (top + h)[:, None])
        cols = (r[None] >= left[:, None]) & (r[None] < (left + w)[:, None])
        return (~(rows[:, :, None] & cols[:, None, :]))[:, None].float()

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        keep = self.random_masks(x.shape[0], x.shape[-1], x.device, generator).to(x.dtype)
        return torch.cat([x * keep, 2 * keep - 1], dim=1)

    def adherence(self, samples: Tensor, hint: Tensor) -> Tensor:
        """MSE between the sample and the condition on the known pixels."""
        keep = (hint[:, -1:] > 0).float()
        err = (samples.float() - hint[:, :-1].float()).pow(2) * keep
        return err.flatten(1).sum(1) / (keep.flatten(1).sum(1) * samples.shape[1]).clamp(min=1)

    def show(self, hint: Tensor, channels: int) -> Tensor:
        return hint[:, :-1]

    def from_images(self, images: Tensor, channels: int, image_size: int) -> Tensor:
        """Images with an alpha channel (grayscale + alpha or RGBA): alpha 0 marks the pixels to fill in."""
        _check_images(images, (channels + 1, image_size, image_size), f"images with alpha ({channels} + 1 channels, {image_size}x{image_size})")
        keep = (images[:, -1:] > 0).to(images.dtype)
        return torch.cat([images[:, :-1] * keep, 2 * keep - 1], dim=1)


def _check_images(images: Tensor, shape: tuple[int, int, int], what: str) -> None:
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"control.folder holds images of shape {tuple(images.shape[1:])} (C, H, W); this ControlNet expects {what}")


def load_folder(folder: str | Path, op, channels: int, image_size: int) -> Tensor:
    """The conditions in a folder of condition images (sorted by name), as the operator's hints.

    PNG modes: 1 channel L, 2 LA, 3 RGB, 4 RGBA; every file must have the shape the operator expects (see its
    `from_images`). An unreadable file or a missing / empty folder stops with an error naming `control.folder`."""

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"control.folder={folder} is not a directory of condition images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"control.folder={folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                a = np.asarray(im, dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise ValueError(f"control.folder: {p} is not a readable image ({type(e).__name__}: {e})") from None
        x = torch.from_numpy(a)
        images.append(x[None] if x.ndim == 2 else x.permute(2, 0, 1))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"control.folder={folder}: the images differ in shape ({sorted(shapes)}); all must be alike")
    return op.from_images(to_model_range(torch.stack(images)), channels, image_size)
