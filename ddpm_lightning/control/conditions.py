"""Conditions of a ControlNet, computed from images in [-1, 1] (conf/control/): `lowres` (super-resolution),
`edges` (an edge map) and `mask` (inpainting). Each operator gives

- `op(x, generator)`: the condition ("hint") of images x [B, C, H, W], shaped [B, hint_channels(C), H, W];
- `adherence(samples, hint)`: per sample, the mean squared difference between the condition and the same
  operator applied to the sample (how well the samples obey their conditions);
- `show(hint, C)`: the condition as a C-channel image in [-1, 1], for condition | sample grids;
- `from_images(images, C)`: the condition from user-supplied condition images (a folder, see `load_folder`).
"""

from __future__ import annotations

import os
import stat
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


def _open_regular(path: Path):
    """`path` opened for reading if it is a regular file (after links); a ValueError naming it otherwise. Opened
    without blocking and checked on the open file, so a FIFO named like an image cannot hang the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError(f"control.folder: {path} is not a regular file (a FIFO, device or directory); remove it or rename it")
    return f


def _pixels(im: Image.Image, path: Path) -> np.ndarray:
    """An opened condition image as uint8 [H, W] or [H, W, C], converted by its mode: L, LA, RGB and RGBA as they
    are; 1-bit as 0 / 255; 16-bit grayscale scaled to 8 bits (v / 257, rounded); palette images to RGB (RGBA
    with transparency), then to L (LA) where every colour is a grey; CMYK and YCbCr to RGB. Other modes are
    refused, naming the file."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(im, dtype=np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"control.folder: {path} holds {mode} values outside 0..65535; save it as 8- or 16-bit grayscale")
        return np.rint(a / 257).astype(np.uint8)
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in im.info
        a = np.asarray(im.convert("RGBA" if alpha else "RGB"), dtype=np.uint8)
        grey = (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        return a[..., [0, 3]] if grey and alpha else a[..., 0] if grey else a
    if mode in ("La", "RGBa", "CMYK", "YCbCr"):
        return np.asarray(im.convert({"La": "LA", "RGBa": "RGBA"}.get(mode, "RGB")), dtype=np.uint8)
    raise ValueError(
        f"control.folder: {path} has the image mode {mode}, which is not read as a condition (use 8-bit grayscale, "
        "grayscale + alpha, RGB or RGBA; 1-bit, palette and 16-bit grayscale images are converted)"
    )


def read_condition_image(path: Path) -> Tensor:
    """One condition image as uint8 [C, H, W] (see `_pixels` for the modes); a ValueError naming the file where it
    is not a regular file, not a readable image, or of a mode that is not read."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            a = _pixels(im, path).copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"control.folder: {path} is not a readable image ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(e).startswith("control.folder: "):
            raise
        raise ValueError(f"control.folder: {path} is not a readable image ({type(e).__name__}: {e})") from None
    x = torch.from_numpy(a)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def load_folder(folder: str | Path, op, channels: int, image_size: int) -> Tensor:
    """The conditions in a folder of condition images (sorted by name), as the operator's hints.

    PNG modes: 1 channel L, 2 LA, 3 RGB, 4 RGBA (1-bit, palette and 16-bit grayscale images converted, see
    `read_condition_image`); every file must have the shape the operator expects (see its `from_images`). A file
    that is not a regular file, an unreadable file or a missing / empty folder stops with an error naming
    `control.folder`."""

    return op.from_images(to_model_range(read_image_folder(folder, "control.folder")), channels, image_size)


def read_image_folder(folder: str | Path, what: str) -> Tensor:
    """The PNG / JPEG images of a folder (sorted by name, `read_condition_image`), uint8 [N, C, H, W]; a missing or
    empty folder, or images of different shapes, stop with an error naming the config key `what`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}={folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what}={folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [read_condition_image(p) for p in files]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"{what}={folder}: the images differ in shape ({sorted(shapes)}); all must be alike")
    return torch.stack(images)
