"""Few-step samplers on a grid of noise levels: DPM-Solver++(2M) (Lu et al. 2022) and the samplers of Karras et
al. 2022 (EDM: Heun, Euler, stochastic churn) with an Euler ancestral variant.

They work on any schedule in its EDM form: x^ = x_t / alpha(t) = x_0 + s eps with the noise level
s = sigma(t) / alpha(t) (`Schedule.noise_level`), whose probability-flow ODE is dx^/ds = (x^ - D(x^; s)) / s with
D the denoiser's x_0 prediction (Karras et al. eq. 3 with their s(t) = 1, sigma(t) = t). The preconditioning
(`D` and `scaling` of denoiser.py) maps a level back to its time and scale for the network. The grid s_0 > ... >
s_{N-1} > s_N = 0 comes from the one `grids.grid(schedule, steps, spacing, rho, levels=True)` or is passed in as
`sigmas`, so a solver never knows how it was chosen. Network evaluations: N for dpmpp_2m, euler and
euler_ancestral; 2N - 1 for heun (its last step, to s = 0, is an Euler step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lightning.diffusion.denoiser import D, Denoiser, scaling
from ddpm_lightning.diffusion.grids import check_sigmas, check_spacing, grid
from ddpm_lightning.diffusion.samplers.noise import PerSampleNoise
from ddpm_lightning.diffusion.samplers.report import report

CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def levels(schedule, steps: int = 10, spacing: str = "karras", rho: float = 7.0, sigmas: Sequence[float] | None = None) -> list[float]:
    """The noise levels a sampler visits: `sigmas` as handed in (decreasing, ending at 0), else the one
    `grids.grid(schedule, steps, spacing, rho, levels=True)`."""
    return grid(schedule, steps, spacing, rho, levels=True) if sigmas is None else check_sigmas(sigmas)


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, clip_denoised: bool = False, **cond) -> Tensor:
    """The denoiser's D(x^; sigma) (Karras et al. 2022 eq. 2), clipped to [-1, 1] with clip_denoised."""
    x0 = D(denoiser, x, sigma, **cond)
    return x0.clamp(-1, 1) if clip_denoised else x0


def _report(callback, k: int, denoiser: Denoiser, x: Tensor, sigma: float, denoised: Tensor | None) -> None:
    """callback(k, x_t) with x_t = s(t) x^ at the level just reached (x^ itself at sigma = 0, the data)."""
    if callback is not None:
        report(callback, k, x if sigma == 0 else scaling(denoiser.schedule, sigma, x) * x, denoised)


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


@torch.no_grad()
def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 10,
    spacing: str = "log_snr",
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    clip_denoised: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Lu et al. 2022 (DPM-Solver++) Algorithm 2, the multistep second-order solver in data-prediction form over
    lambda = -log s: x^_i = (s_i / s_{i-1}) x^_{i-1} - (e^{-h_i} - 1) D_i with h_i = lambda_i - lambda_{i-1},
    D_i = (1 + 1 / 2r_i) x0_{i-1} - 1 / 2r_i x0_{i-2}, r_i = h_{i-1} / h_i. The first step (no earlier x0) is
    first order, i.e. a DDIM (eta = 0) step; the last, to s = 0, returns the x0 prediction. Deterministic:
    `noise` is not used."""
    check_dpmpp_2m(denoiser.schedule, steps=steps, spacing=spacing, rho=rho, sigmas=sigmas)
    sigmas = levels(denoiser.schedule, steps, spacing, rho, sigmas)
    x = x / scaling(denoiser.schedule, sigmas[0], x)  # x^ = x_T / s(T)
    x0_prev, h_prev = None, None
    for k, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        x0 = _denoise(denoiser, x, s, clip_denoised, **cond)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = (s_next / s) * x - math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        _report(callback, k, denoiser, x, s_next, x0)
    return x


def check_dpmpp_2m(schedule, steps: int = 10, spacing: str = "log_snr", rho: float = 7.0, sigmas=None, **options) -> None:
    churn = [k for k in CHURN_OPTIONS if k in options]
    if churn:
        raise ValueError(
            f"sampler.{churn[0]}: dpmpp_2m is deterministic and takes no churn; use sampler=heun or sampler=euler "
            "for Karras et al.'s stochastic sampler"
        )
    _check_grid(schedule, steps, spacing, rho, sigmas)


dpmpp_2m.check = check_dpmpp_2m


def _check_grid(schedule, steps, spacing, rho, sigmas) -> None:
    check_spacing(steps, spacing, rho)
    if sigmas is None:
        grid(schedule, steps, spacing, rho, levels=True)
    else:
        check_sigmas(sigmas)


# ---------------------------------------------------------------------------------------------------------
# Karras et al. 2022: Euler and Heun with stochastic churn


def _churn(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float, sigma_max: float) -> float:
    """Karras et al. Algorithm 2 line 4-5: s^ = s (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) on
    [S_tmin, S_tmax], else 0; capped at the schedule's sigma_max (the network was never trained above it)."""
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    return min(sigma * (1 + gamma), max(sigma, sigma_max))


def _edm_steps(
    denoiser: Denoiser, x: Tensor, noise: PerSampleNoise, second_order: bool, steps: int, spacing: str, rho: float,
    sigmas, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float, clip_denoised: bool, callback, **cond,
) -> Tensor:
    """Karras et al. 2022 Algorithm 2 (Algorithm 1 when s_churn = 0): raise the level to s^ by adding noise,
    then an Euler step from s^ to s_{i+1}, corrected with the trapezoidal rule (Heun) unless s_{i+1} = 0."""
    sigmas = levels(denoiser.schedule, steps, spacing, rho, sigmas)
    x = x / scaling(denoiser.schedule, sigmas[0], x)  # x^ = x_T / s(T)
    n = len(sigmas) - 1
    for k, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        s_hat = _churn(s, n, s_churn, s_tmin, s_tmax, sigmas[0])
        if s_hat > s:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * noise.randn_like(x)
        x0 = _denoise(denoiser, x, s_hat, clip_denoised, **cond)
        d = (x - x0) / s_hat
        x_next = x + (s_next - s_hat) * d
        if second_order and s_next > 0:
            d_next = (x_next - _denoise(denoiser, x_next, s_next, clip_denoised, **cond)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
        _report(callback, k, denoiser, x, s_next, x0)
    return x


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 10,
    spacing: str = "karras",
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    clip_denoised: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Karras et al. 2022 Algorithm 1 (deterministic 2nd-order Heun, the last step Euler; 2N - 1 evaluations),
    or Algorithm 2 with s_churn > 0 (stochastic: S_churn, S_tmin, S_tmax, S_noise)."""
    check_edm(denoiser.schedule, steps=steps, spacing=spacing, rho=rho, sigmas=sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return _edm_steps(denoiser, x, noise, True, steps, spacing, rho, sigmas, s_churn, s_tmin, s_tmax, s_noise, clip_denoised, callback, **cond)


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 10,
    spacing: str = "karras",
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    clip_denoised: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Karras et al. 2022 Algorithms 1-2 without the Heun correction: first-order Euler steps of the probability-
    flow ODE, with optional stochastic churn (s_churn > 0)."""
    check_edm(denoiser.schedule, steps=steps, spacing=spacing, rho=rho, sigmas=sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return _edm_steps(denoiser, x, noise, False, steps, spacing, rho, sigmas, s_churn, s_tmin, s_tmax, s_noise, clip_denoised, callback, **cond)


def check_edm(schedule, steps: int = 10, spacing: str = "karras", rho: float = 7.0, sigmas=None, s_churn: float = 0.0,
              s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **_) -> None:
    _check_grid(schedule, steps, spacing, rho, sigmas)
    if s_churn < 0:
        raise ValueError(f"sampler.s_churn={s_churn} must be non-negative (0: deterministic, Karras et al. Algorithm 1)")
    if s_noise < 0:
        raise ValueError(f"sampler.s_noise={s_noise} must be non-negative")
    if not 0 <= s_tmin <= s_tmax:
        raise ValueError(f"sampler.s_tmin={s_tmin} and sampler.s_tmax={s_tmax} need 0 <= s_tmin <= s_tmax")


heun.check = check_edm
euler.check = check_edm


# ---------------------------------------------------------------------------------------------------------
# Euler ancestral


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 10,
    spacing: str = "karras",
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    clip_denoised: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond,
) -> Tensor:
    """Ancestral sampling in EDM form (as k-diffusion's sample_euler_ancestral): an Euler step down to
    s_down = sqrt(s_{i+1}^2 - s_up^2), then fresh noise of std s_up = min(s_{i+1}, eta s_{i+1} sqrt(1 - s_{i+1}^2 /
    s_i^2)). With eta = 1 a step is DDIM's eta = 1 step (the DDPM posterior with beta~, Song et al. 2021 eq. 16) on
    this grid; eta = 0 is Euler."""
    check_euler_ancestral(denoiser.schedule, steps=steps, spacing=spacing, rho=rho, sigmas=sigmas, eta=eta, s_noise=s_noise)
    sigmas = levels(denoiser.schedule, steps, spacing, rho, sigmas)
    x = x / scaling(denoiser.schedule, sigmas[0], x)  # x^ = x_T / s(T)
    for k, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        x0 = _denoise(denoiser, x, s, clip_denoised, **cond)
        s_up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1 - s_next**2 / s**2)))
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x0 + (s_down / s) * (x - x0)  # the Euler step x + (s_down - s) (x - x0) / s
        if s_up > 0:
            x = x + s_up * s_noise * noise.randn_like(x)
        _report(callback, k, denoiser, x, s_next, x0)
    return x


def check_euler_ancestral(schedule, steps: int = 10, spacing: str = "karras", rho: float = 7.0, sigmas=None,
                          eta: float = 1.0, s_noise: float = 1.0, **options) -> None:
    churn = [k for k in ("s_churn", "s_tmin", "s_tmax") if k in options]
    if churn:
        raise ValueError(f"sampler.{churn[0]}: euler_ancestral adds its noise by eta; churn belongs to sampler=heun / euler")
    _check_grid(schedule, steps, spacing, rho, sigmas)
    if eta < 0 or s_noise < 0:
        raise ValueError(f"sampler.eta={eta} and sampler.s_noise={s_noise} must be non-negative")


euler_ancestral.check = check_euler_ancestral
