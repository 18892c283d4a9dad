"""The Denoiser's parameterisations (eps, x0, v, EDM, flow) on every schedule: a network that outputs the exact target of its
parameterisation (eps, x_0, or v = alpha eps - sigma x_0, Salimans & Ho 2022) must give back eps, x_0 and the
score exactly, and a zero loss; VE, NCSN and sub-VP have alpha^2 + sigma^2 != 1."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from helpers.config import compose_cfg
from ddpm_lightning.diffusion.denoiser import PARAMETERIZATIONS, Denoiser
from ddpm_lightning.diffusion.losses import eps_mse

SCHEDULES = ["linear", "cosine", "ncsn", "vp_sde", "subvp_sde", "ve_sde"]


class Oracle(torch.nn.Module):
    """Returns the given target whatever its input (the exact network of a parameterisation)."""

    def __init__(self):
        super().__init__()
        self.target = None

    def forward(self, x, label, **cond):
        return self.target


def _draw(schedule, n=64, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(0)
    if getattr(schedule, "continuous", False):
        t = schedule.t_min + (1 - schedule.t_min) * torch.rand(n, generator=g)
        t[:2] = torch.tensor([schedule.t_min, 1.0])  # both ends of the time range
    else:
        t = torch.randint(0, schedule.T, (n,), generator=g)
        t[:2] = torch.tensor([0, schedule.T - 1])
    return torch.randn((n, *shape), generator=g).clamp(-1, 1), torch.randn((n, *shape), generator=g), t


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_round_trip(name, parameterization):
    schedule = instantiate(compose_cfg([f"schedule={name}"]).schedule)
    x0, eps, t = _draw(schedule)
    alpha, sigma = (f(t).view(-1, 1, 1, 1) for f in (schedule.alpha, schedule.sigma))
    x_t = schedule.q_sample(x0, t, eps)
    net = Oracle()
    net.target = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}.get(parameterization)
    if net.target is None:  # EDM's and flow matching's targets, as their preconditionings state them
        net.target = PARAMETERIZATIONS[parameterization].target(x0, eps, alpha, sigma)
    d = Denoiser(net, schedule, parameterization)
    # Rounding: eps = (x_t - alpha x_0) / sigma magnifies float32's by 1 / sigma (x0 networks at t near 0, compared
    # as sigma eps), x_0 = (x_t - sigma eps) / alpha by sigma / alpha (VE / NCSN at the largest noise).
    w = sigma if parameterization in ("x0", "edm") else torch.ones_like(sigma)
    scale = float(sigma.max() / alpha.min())
    torch.testing.assert_close(w * d.eps(x_t, t), w * eps, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.x0(x_t, t), x0, atol=2e-5 * max(1.0, scale), rtol=1e-4)
    torch.testing.assert_close(w * sigma * d.score(x_t, t), -w * eps, atol=2e-5, rtol=1e-4)
    losses, _ = eps_mse(d, x0, t=t, eps=eps)  # the loss trains the network towards exactly this target
    assert float((losses * w.flatten() ** 2).max()) < 1e-8


def test_v_inversion_needs_the_schedules_own_norm():
    """For VE, alpha^2 + sigma^2 is far from 1: the variance-preserving inversion sigma x_t + alpha v is wrong there."""
    schedule = instantiate(compose_cfg(["schedule=ve_sde"]).schedule)
    x0, eps, t = _draw(schedule)
    alpha, sigma = (f(t).view(-1, 1, 1, 1) for f in (schedule.alpha, schedule.sigma))
    x_t, v = schedule.q_sample(x0, t, eps), alpha * eps - sigma * x0
    assert (sigma * x_t + alpha * v - eps).abs().max() > 1.0
    torch.testing.assert_close(Denoiser.eps_from_v(x_t, alpha, sigma, v), eps, atol=2e-5, rtol=1e-4)
