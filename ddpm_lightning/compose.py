"""Making config groups compose: settings of one group that depend on another (the U-Net's attention
resolutions on the data's image size) are adjusted here, with a logged note, before anything is built."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def fit_attention(attn_resolutions: list[int], image_size: int, levels: int) -> list[int]:
    """Attention resolutions a U-Net of `levels` levels reaches at `image_size` (resolutions image_size,
    image_size / 2, ..., image_size / 2^(levels - 1)): a resolution above the image is moved to the image's
    own, one below the lowest level to the lowest level (the papers place attention at 16x16 whatever the image
    size: Ho et al. 2020 App. B, Song et al. 2021 DDIM's CelebA 64; a model config made for another size keeps
    the nearest meaning). A resolution between two levels is left as it is: it is a contradiction, which the
    U-Net reports."""
    reached = [image_size // 2**i for i in range(levels)]
    fitted: list[int] = []
    for r in attn_resolutions:
        r = reached[0] if r > reached[0] else reached[-1] if r < reached[-1] else r
        if r not in fitted:
            fitted.append(r)
    return fitted


def fit_model_to_data(cfg: DictConfig) -> None:
    """Adjust `cfg.model` (in place, before it is resolved into the module's config) to `cfg.data`, logging each
    change. Only settings that are a matter of scale change; a contradiction is left for the model's check."""
    model = cfg.get("model")
    if model is None or "attn_resolutions" not in model or "ch_mult" not in model or "image_size" not in model:
        return
    size, levels, attn = int(model.image_size), len(model.ch_mult), [int(r) for r in model.attn_resolutions]
    if size < 1 or size % 2 ** (levels - 1):
        return  # the U-Net names the divisibility it needs
    fitted = fit_attention(attn, size, levels)
    if fitted != attn:
        reached = [size // 2**i for i in range(levels)]
        log.info(
            "model.attn_resolutions=%s adjusted to %s: at image_size %d the U-Net's %d levels have resolutions %s "
            "(set model.attn_resolutions to some of these to choose)", attn, fitted, size, levels, reached,
        )
        with open_dict(model):
            model.attn_resolutions = fitted


def auto_precision(accelerator: str, cuda: bool | None = None, bf16: bool | None = None) -> str:
    """`trainer.precision=auto`: bf16-mixed on a GPU that computes in bf16 (Ampere and later), else 32-true (on a CPU
    bf16 autocast pays only on some CPUs and changes the numbers, so it stays a choice: trainer.precision=bf16-mixed)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if accelerator not in ("auto", "gpu", "cuda") or not cuda:
        return "32-true"
    bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    return "bf16-mixed" if bf16 else "32-true"


def resolve_precision(trainer: DictConfig) -> None:
    """Replace `precision: auto` (the default) in a trainer config by what `auto_precision` picks, logging it."""
    if trainer.get("precision") == "auto":
        picked = auto_precision(str(trainer.get("accelerator", "auto")))
        log.info("trainer.precision=auto: %s", picked)
        with open_dict(trainer):
            trainer.precision = picked
