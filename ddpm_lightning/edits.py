"""`python evaluate.py task=inpaint | task=sdedit`: edit a folder of images with a trained model (RePaint
inpainting, SDEdit image-to-image; ddpm_lightning.diffusion.editing), every input checked before any compute.
Writes the results as PNGs in <output_dir>/images/ and grid.png, one row per image: input | mask | result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from ddpm_lightning import registry
from ddpm_lightning.control.conditions import read_image_folder
from ddpm_lightning.diffusion.editing import Inpaint, SDEdit
from ddpm_lightning.images import save_grid, to_model_range, to_uint8
from ddpm_lightning.loading import load_model

TASKS = ("sample", "inpaint", "sdedit")
MASK_PRESETS = ("lower", "right", "rect")


def read_images(folder: str | Path, what: str = "edit.images") -> Tensor:
    """The PNG / JPEG images of a folder (sorted by name), uint8 [N, C, H, W]."""
    return read_image_folder(folder, what)


def make_mask(spec: str, rect: Any, size: tuple[int, int]) -> Tensor:
    """The mask [N or 1, 1, H, W], 1 where the input is kept: a preset (lower: the lower half inpainted; right: the
    right half; rect: the rectangle edit.rect = [top, left, height, width]) or a folder of black (inpaint) and
    white (keep) images, one per input image."""
    h, w = size
    mask = torch.ones(1, 1, h, w)
    if spec == "lower":
        mask[..., h // 2:, :] = 0
    elif spec == "right":
        mask[..., :, w // 2:] = 0
    elif spec == "rect":
        if rect is None or len(rect) != 4 or any(int(v) != v or v < 0 for v in rect):
            raise ValueError(f"edit.rect={rect} must be [top, left, height, width] in pixels for edit.mask=rect")
        top, left, height, width = (int(v) for v in rect)
        if height < 1 or width < 1 or top + height > h or left + width > w:
            raise ValueError(f"edit.rect={list(rect)} does not lie inside the {h}x{w} image")
        mask[..., top:top + height, left:left + width] = 0
    else:
        pixels = read_images(spec, "edit.mask")
        if pixels.shape[1] != 1 or not bool(((pixels == 0) | (pixels == 255)).all()):
            raise ValueError(f"edit.mask={spec}: masks must be binary grayscale images, 0 (inpaint) or 255 (keep) only")
        mask = (pixels == 255).float()
    return mask


def _edit(cfg: DictConfig, images: Tensor, mask: Tensor | None) -> Inpaint | SDEdit:
    e = cfg.edit
    if cfg.task == "inpaint":
        return Inpaint(images, mask, e.jump_length, e.jump_n_sample)
    return SDEdit(images, e.strength)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Edit every image of cfg.edit.images with the checkpoint; the image i has seed seed_offset + i."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} must be one of {TASKS}")
    if not cfg.get("ckpt_path") or not cfg.edit.get("images"):
        raise ValueError(f"task={cfg.task} needs ckpt_path=<checkpoint> and edit.images=<folder of images>")
    module = load_model(cfg.ckpt_path, use_ema=cfg.use_ema)
    sampler_cfg = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else module.hparams.sampler
    sampler = registry.build(sampler_cfg, "sampler")
    images = to_model_range(read_images(cfg.edit.images)).float()
    mask = make_mask(cfg.edit.mask, cfg.edit.get("rect"), tuple(images.shape[-2:])) if cfg.task == "inpaint" else None
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + len(images)))
    _edit(cfg, images, mask).check(sampler, module.schedule, module.data_shape, len(seeds))  # before any compute
    results = []
    for i in range(0, len(images), cfg.batch_size):
        j = min(i + cfg.batch_size, len(images))
        part = None if mask is None else (mask if len(mask) == 1 else mask[i:j])
        results.append(module.sample(seeds[i:j], sampler, edit=_edit(cfg, images[i:j], part)))
    out = Path(cfg.output_dir or Path(cfg.ckpt_path).resolve().parent.parent / "eval" / cfg.task)
    _save(out, images, mask, torch.cat(results))
    return {"task": cfg.task, "images": len(images), "output_dir": str(out)}


def _save(out: Path, images: Tensor, mask: Tensor | None, results: Tensor) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, x in enumerate(to_uint8(results).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(out / "images" / f"{k:06d}.png")
    c = images.shape[1]
    shown = torch.ones_like(images) if mask is None else (mask * 2 - 1).expand(len(images), c, -1, -1)
    rows = torch.stack([images, shown, results], 1).flatten(0, 1)
    save_grid(rows, out / "grid.png", nrow=3)
