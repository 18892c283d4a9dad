"""Samplers of the discrete-time family: DDPM ancestral sampling and DDIM.

Plain functions of (denoiser, x_T, noise): they read alpha, sigma and the DDPM
buffers from `denoiser.schedule` and never branch on the method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddpm_lightning.denoiser import Denoiser
from ddpm_lightning.samplers.noise import PerSampleNoise

VARIANCES = ("fixed_large", "fixed_small")


def _require(schedule, attrs: tuple[str, ...], sampler: str) -> None:
    missing = [a for a in attrs if not hasattr(schedule, a)]
    if missing:
        raise ValueError(
            f"sampler={sampler} needs a schedule with {', '.join(missing)} "
            f"(a discrete DDPM schedule); {type(schedule).__name__} has none. Choose another sampler."
        )


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    variance: str = "fixed_large",
    clip_denoised: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Ho et al. 2020 Algorithm 2: x_{t-1} = mu~_t(x_t, x_0(x_t)) + sigma_t z, with the posterior mean of eq. 7
    and sigma_t^2 = beta_t ("fixed_large", the paper's CIFAR-10 choice) or beta~_t ("fixed_small")."""
    schedule = denoiser.schedule
    _require(schedule, ("betas", "posterior_mean_coef1", "posterior_variance"), "ddpm")
    if variance not in VARIANCES:
        raise ValueError(f"sampler.variance={variance!r} must be one of {VARIANCES}")
    var = schedule.betas if variance == "fixed_large" else schedule.posterior_variance
    for i in reversed(range(schedule.T)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = denoiser.x0(x, t, **cond)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        x = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x
        if i > 0:
            x = x + var[i].sqrt() * noise.randn_like(x)
        if callback is not None:
            callback(i, x)
    return x


def check_ddpm(schedule, variance: str = "fixed_large", **_) -> None:
    _require(schedule, ("betas", "posterior_mean_coef1", "posterior_variance"), "ddpm")
    if variance not in VARIANCES:
        raise ValueError(f"sampler.variance={variance!r} must be one of {VARIANCES}")


ddpm.check = check_ddpm


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_denoised: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Song, Meng & Ermon 2021 eq. 12: x_s = alpha_s x_0 + sqrt(sigma_s^2 - c^2) eps + c z, with
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2) (eq. 16; eta = 1 is DDPM with beta~)."""
    if eta < 0:
        raise ValueError(f"sampler.eta={eta} must be non-negative")
    schedule = denoiser.schedule
    ts = schedule.timesteps(steps, spacing)
    one = torch.ones((), device=x.device)
    for k, t_now in enumerate(ts):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        alpha, sigma = schedule.alpha(t[:1])[0], schedule.sigma(t[:1])[0]
        if k + 1 < len(ts):
            s = torch.full((1,), ts[k + 1], device=x.device)
            alpha_s, sigma_s = schedule.alpha(s)[0], schedule.sigma(s)[0]
        else:
            alpha_s, sigma_s = one, 0 * one  # the last step lands on the data, t = 0
        eps = denoiser.eps(x, t, **cond)
        x0 = denoiser.x0_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - alpha * x0) / sigma
        c = eta * sigma_s * (1 - (alpha * sigma_s / (alpha_s * sigma)) ** 2).clamp(min=0).sqrt()
        x = alpha_s * x0 + (sigma_s**2 - c**2).clamp(min=0).sqrt() * eps
        if k + 1 < len(ts) and eta > 0:
            x = x + c * noise.randn_like(x)
        if callback is not None:
            callback(k, x)
    return x


def check_ddim(schedule, steps: int = 50, eta: float = 0.0, spacing: str = "uniform", **_) -> None:
    if eta < 0:
        raise ValueError(f"sampler.eta={eta} must be non-negative")
    schedule.timesteps(steps, spacing)


ddim.check = check_ddim
