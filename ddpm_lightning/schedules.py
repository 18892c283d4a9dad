"""Noise schedules: the forward process x_t = alpha(t) x_0 + sigma(t) eps.

Every method in the package (DDPM, NCSN, score SDEs) is a schedule of this form
(see DESIGN.md). A schedule is immutable: samplers pick time steps from it but
never change it. Its tensors are non-persistent buffers, so they follow the
module's device and never enter a checkpoint.

DDPM's discrete time uses 0-based indices: index i is the paper's t = i + 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def expand_as(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example vector [B] so that it broadcasts against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020 §4: beta_t increasing linearly from beta_1 to beta_T (float64)."""
    _check_T(T)
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(
            f"schedule.beta_start={beta_start} and schedule.beta_end={beta_end} must lie in (0, 1)"
        )
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 17: abar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    beta_t = min(1 - abar_t / abar_{t-1}, max_beta)."""
    _check_T(T)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"schedule.max_beta={max_beta} must lie in (0, 1)")
    if s < 0:
        raise ValueError(f"schedule.s={s} must be non-negative")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _check_T(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"schedule.T={T!r} must be a positive integer")


class DiscreteSchedule(nn.Module):
    """DDPM's discrete forward process, Ho et al. 2020 eq. 4:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the buffers of §3 under their paper names."""

    def __init__(self, betas: Tensor):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("schedule betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"schedule betas must lie in (0, 1); got min {betas.min().item():.3g}, "
                f"max {betas.max().item():.3g} (check schedule.beta_start / schedule.beta_end)"
            )
        self.T = len(betas)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Ho et al. eq. 7: beta~_t and the two coefficients of mu~_t(x_t, x_0).
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_1 = 0: clip the log at t = 1 with beta~_2, as the official code does.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def alpha(self, t: Tensor) -> Tensor:
        """sqrt(abar_t): the signal scale of q(x_t | x_0)."""
        return self.sqrt_alphas_cumprod[t]

    def sigma(self, t: Tensor) -> Tensor:
        """sqrt(1 - abar_t): the noise scale of q(x_t | x_0)."""
        return self.sqrt_one_minus_alphas_cumprod[t]

    def net_label(self, t: Tensor) -> Tensor:
        """The network's time input: the step index, as in Ho et al.'s code."""
        return t.float()

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ Uniform({1, ..., T}) per example (Algorithm 1), as 0-based indices."""
        return torch.randint(0, self.T, (n,), device=device, generator=generator)

    def timesteps(self, steps: int | None = None, spacing: str = "uniform") -> list[int]:
        """Decreasing step indices for a sampler that visits `steps` of the T steps.

        spacing "uniform" or "quadratic" follows Song et al. 2021 (DDIM) App. D.2: quadratic for CIFAR-10."""
        if steps is None or steps == self.T:
            return list(range(self.T - 1, -1, -1))
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampler.steps={steps} must lie in [1, schedule.T={self.T}]")
        if spacing == "uniform":
            seq = [i * (self.T // steps) for i in range(steps)]
        elif spacing == "quadratic":
            seq = sorted({int(v) for v in torch.linspace(0, math.sqrt(self.T * 0.8), steps).pow(2).tolist()})
        else:
            raise ValueError(f"sampler.spacing={spacing!r} must be 'uniform' or 'quadratic'")
        return seq[::-1]

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Ho et al. eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return expand_as(self.alpha(t), x0) * x0 + expand_as(self.sigma(t), x0) * eps

    def prior_std(self) -> float:
        """Standard deviation of the prior p(x_T) = N(0, I)."""
        return 1.0

    def extra_repr(self) -> str:
        return f"T={self.T}, beta_1={self.betas[0].item():.3g}, beta_T={self.betas[-1].item():.3g}"


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """DDPM's linear schedule (Ho et al. 2020 §4)."""
    return DiscreteSchedule(linear_betas(T, beta_start, beta_end))


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021 §3.2)."""
    return DiscreteSchedule(cosine_betas(T, s, max_beta))
