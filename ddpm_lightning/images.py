"""Conversions between the model's [-1, 1] range and uint8 images, in one place."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1] (Ho et al. §3.3: data scaled linearly to [-1, 1])."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, display_scale: int = 1) -> Tensor:
    """Save [-1, 1] images [N, C, H, W] as one PNG grid, each image enlarged `display_scale` times
    (nearest neighbour); returns the uint8 grid [C, H', W']."""
    nrow = nrow or max(1, math.isqrt(images.shape[0] - 1) + 1)
    images = to_uint8(images).cpu()
    if display_scale > 1:
        images = images.repeat_interleave(display_scale, -1).repeat_interleave(display_scale, -2)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return grid
