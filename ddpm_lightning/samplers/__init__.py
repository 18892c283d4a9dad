"""Samplers: plain functions of (denoiser, x_T, per-sample noise, options, **cond)."""

from ddpm_lightning.samplers.ddpm import ddim, ddpm
from ddpm_lightning.samplers.noise import PerSampleNoise

__all__ = ["PerSampleNoise", "ddim", "ddpm"]
