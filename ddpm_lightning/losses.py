"""Training losses, written once for every schedule."""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm_lightning.denoiser import Denoiser


def eps_mse(
    denoiser: Denoiser,
    x0: Tensor,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    **cond,
) -> tuple[Tensor, Tensor]:
    """Ho et al. 2020 Algorithm 1 / eq. 14 (L_simple): ||eps - eps_theta(alpha x_0 + sigma eps, t)||^2,
    t drawn per example from the schedule (unless given, as eps). Returns the per-example losses and the t used."""
    schedule = denoiser.schedule
    t = schedule.sample_t(x0.shape[0], x0.device, generator) if t is None else t
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator) if eps is None else eps
    x_t = schedule.q_sample(x0, t, eps)
    return (eps - denoiser.eps(x_t, t, **cond)).float().pow(2).flatten(1).mean(1), t
