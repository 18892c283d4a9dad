"""Samplers: plain functions of (denoiser, x_T, per-sample noise, options, **cond)."""

from __future__ import annotations

import functools
import math

from ddpm_lightning.diffusion.samplers.ddpm import ddim, ddpm
from ddpm_lightning.diffusion.samplers.karras import (
    dpmpp_2m,
    euler,
    euler_ancestral,
    heun,
)
from ddpm_lightning.diffusion.samplers.noise import PerSampleNoise
from ddpm_lightning.diffusion.samplers.score import ald, ode, pc

__all__ = [
    "PerSampleNoise", "ald", "check_compatible", "ddim", "ddpm", "dpmpp_2m", "euler", "euler_ancestral", "heun", "ode", "pc",
]


def check_compatible(sampler, schedule, learn_sigma: bool = False) -> None:
    """Refuse a sampler (function or functools.partial of one) that is invalid for `schedule`, or whose options
    are bad, before any compute: each sampler function may carry a `check(schedule, **options)`. A learned
    variance (`variance="learned"`) needs a model that learns it (`learn_sigma`)."""
    func, options = sampler, {}
    while isinstance(func, functools.partial):
        options = {**func.keywords, **options}
        func = func.func
    for key, value in options.items():  # NaN passes every comparison of the checks below, and samples black images
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"sampler.{key}=nan must be a number")
    check = getattr(func, "check", None)
    if check is not None:
        check(schedule, **options)
    if options.get("variance") == "learned" and not learn_sigma:
        raise ValueError("sampler.variance=learned needs a model trained with model.learn_sigma=true (or choose fixed_large / fixed_small)")
