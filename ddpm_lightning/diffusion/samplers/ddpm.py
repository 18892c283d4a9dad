"""Samplers of the discrete-time family: DDPM ancestral sampling and DDIM.

Plain functions of (denoiser, x_T, noise): they take their time grid from `grids.grid` (or `ts` handed in), read
alpha, sigma and the DDPM buffers from `denoiser.schedule` and never branch on the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lightning.diffusion.denoiser import Denoiser, interpolated_log_variance
from ddpm_lightning.diffusion.grids import (
    DEFAULT_SPACING,
    DISCRETE_SPACINGS,
    LEVEL_SPACINGS,
    grid,
)
from ddpm_lightning.diffusion.samplers.noise import PerSampleNoise
from ddpm_lightning.diffusion.samplers.report import report
from ddpm_lightning.diffusion.schedules import expand_as

VARIANCES = ("fixed_large", "fixed_small", "learned")


def _require_discrete(schedule, sampler: str) -> None:
    if not getattr(schedule, "discrete", False):  # the declared `Schedule.discrete`; an undeclared object is not
        raise ValueError(
            f"sampler={sampler} needs a schedule with betas, posterior_mean_coef1 and posterior_variance "
            f"(a discrete DDPM schedule); {type(schedule).__name__} has none. Choose another sampler."
        )


def posterior_mean(schedule, t: Tensor, x0: Tensor, x_t: Tensor) -> Tensor:
    """Ho et al. 2020 eq. 7: mu~_t(x_t, x_0) = coef1_t x_0 + coef2_t x_t, per-example indices t [B]."""
    return expand_as(schedule.posterior_mean_coef1[t], x_t) * x0 + expand_as(schedule.posterior_mean_coef2[t], x_t) * x_t


def reverse_log_variance(schedule, t: Tensor, variance: str, like: Tensor, v: Tensor | None = None) -> Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t), broadcastable against `like`: log beta~_t ("fixed_small"), log beta_t
    ("fixed_large"; beta~_2 at t = 1, as Ho et al.'s code) or Nichol & Dhariwal 2021 eq. 15 between log beta_t and
    log beta~_t with the network's v ("learned"; beta~_1 = 0 clipped to beta~_2 as in their code)."""
    log_beta_tilde = expand_as(schedule.posterior_log_variance_clipped[t], like)
    if variance == "fixed_small":
        return log_beta_tilde
    log_beta = expand_as(schedule.betas[t].log(), like)
    if variance == "fixed_large":
        return torch.where(expand_as(t, like) > 0, log_beta, log_beta_tilde)
    return interpolated_log_variance(v, log_beta, log_beta_tilde)


def p_mean_log_variance(
    denoiser: Denoiser, process, x: Tensor, t: Tensor, i: Tensor, eps: Tensor, v: Tensor | None, variance: str,
    clip_denoised: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) = N(mu~_t(x_t, x_0(x_t, eps)), sigma_t^2) (Ho et al. 2020 eq. 11;
    Nichol & Dhariwal 2021 eq. 15): the network at step t, the process's buffers at its index i (i = t unless
    respaced); and the x_0 prediction it used."""
    x0 = denoiser.x0_from_eps(x, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    return posterior_mean(process, i, x0, x), reverse_log_variance(process, i, variance, x, v), x0


def eps_and_v(denoiser: Denoiser, x: Tensor, t: Tensor, variance: str, **cond) -> tuple[Tensor, Tensor | None]:
    """The denoiser's eps, and its learned variance interpolation v when `variance` is "learned"."""
    if variance == "learned":
        if not getattr(denoiser, "learn_sigma", False):
            raise ValueError("variance=learned needs a model trained with model.learn_sigma=true")
        return denoiser.eps_and_v(x, t, **cond)
    return denoiser.eps(x, t, **cond), None


def respaced(schedule, ts: Sequence[int]) -> tuple[list[int], object]:
    """The increasing indices S of the decreasing grid `ts` and the process on them (Nichol & Dhariwal 2021 §4);
    the schedule itself when `ts` is all T indices."""
    ts = [int(t) for t in ts][::-1]
    if ts == list(range(schedule.T)):
        return ts, schedule
    return ts, schedule.respace(ts)


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    variance: str = "fixed_large",
    clip_denoised: bool = True,
    steps: int | None = None,
    spacing: str = DEFAULT_SPACING,
    ts: Sequence[int] | None = None,
    callback: Callable[..., None] | None = None,
    **cond,
) -> Tensor:
    """Ho et al. 2020 Algorithm 2: x_{t-1} = mu~_t(x_t, x_0(x_t)) + sigma_t z, with the posterior mean of eq. 7
    and sigma_t^2 = beta_t ("fixed_large", the paper's CIFAR-10 choice), beta~_t ("fixed_small") or the
    network's interpolation of the two (Nichol & Dhariwal 2021 eq. 15, "learned"). With `steps` < T, the
    respaced process on `steps` of the T indices (Nichol & Dhariwal §4; its own beta_t and beta~_t), or on the
    step indices `ts` handed in (decreasing)."""
    check_ddpm(denoiser.schedule, variance, steps, spacing, ts)
    ts, process = respaced(denoiser.schedule, grid(denoiser.schedule, steps, spacing) if ts is None else ts)
    for k in reversed(range(len(ts))):
        t = torch.full((x.shape[0],), ts[k], device=x.device, dtype=torch.long)
        eps, v = eps_and_v(denoiser, x, t, variance, **cond)
        mean, log_var, x0 = p_mean_log_variance(denoiser, process, x, t, torch.full_like(t, k), eps, v, variance, clip_denoised)
        x = mean + log_var.mul(0.5).exp() * noise.randn_like(x) if k > 0 else mean
        report(callback, k, x, x0)
    return x


def check_ddpm(schedule, variance: str = "fixed_large", steps: int | None = None, spacing: str = DEFAULT_SPACING,
               ts: Sequence[int] | None = None, **_) -> None:
    _require_discrete(schedule, "ddpm")
    if variance not in VARIANCES:
        raise ValueError(f"sampler.variance={variance!r} must be one of {VARIANCES}")
    if spacing in LEVEL_SPACINGS and ts is None and steps is not None:
        raise ValueError(f"sampler.spacing={spacing!r} gives fractional steps; ddpm respaces on step indices: use one of {DISCRETE_SPACINGS}")
    if ts is None:
        grid(schedule, steps, spacing)
    elif any(int(t) != t for t in ts):
        raise ValueError(f"sampler.ts={list(ts)} must be step indices (integers) for ddpm")
    else:
        schedule.respace(sorted(int(t) for t in ts))


ddpm.check = check_ddpm


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = DEFAULT_SPACING,
    ts: Sequence[float] | None = None,
    clip_denoised: bool = False,
    callback: Callable[..., None] | None = None,
    **cond,
) -> Tensor:
    """Song, Meng & Ermon 2021 eq. 12: x_s = alpha_s x_0 + sqrt(sigma_s^2 - c^2) eps + c z, with
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2) (eq. 16; eta = 1 is DDPM with beta~), on the
    decreasing times `ts` (default: `grids.grid(schedule, steps, spacing)`)."""
    if not 0 <= eta < math.inf:
        raise ValueError(f"sampler.eta={eta} must be a finite non-negative number")
    ts = grid(denoiser.schedule, steps, spacing) if ts is None else list(ts)
    for k, t_now in enumerate(ts):
        t_next = ts[k + 1] if k + 1 < len(ts) else None
        x, x0 = ddim_step(denoiser, x, t_now, t_next, eta, clip_denoised, None if noise is None else noise.randn_like, **cond)
        report(callback, k, x, x0)
    return x


def ddim_step(denoiser: Denoiser, x: Tensor, t_now, t_next, eta: float, clip_denoised: bool,
              draw: Callable[[Tensor], Tensor], **cond) -> tuple[Tensor, Tensor]:
    """One step of `ddim` from time t_now to t_next (None: the data, t = 0); `draw(x)` gives the step's noise,
    asked for only where it adds some (eta > 0, not the last step). Returns (x_s, the x_0 prediction)."""
    schedule = denoiser.schedule
    one = torch.ones((), device=x.device)
    t = torch.full((x.shape[0],), t_now, device=x.device)
    alpha, sigma = schedule.alpha(t[:1])[0], schedule.sigma(t[:1])[0]
    if t_next is not None:
        s = torch.full((1,), t_next, device=x.device)
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
    if t_next is not None and eta > 0:
        x = x + c * draw(x)
    return x, x0


def check_ddim(schedule, steps: int = 50, eta: float = 0.0, spacing: str = DEFAULT_SPACING, ts=None, **_) -> None:
    if not 0 <= eta < math.inf:
        raise ValueError(f"sampler.eta={eta} must be a finite non-negative number")
    if ts is None:
        grid(schedule, steps, spacing)


ddim.check = check_ddim
