"""Schedules against the papers' values and the closed forms of Ho et al. 2020 §2."""

import math

import pytest
import torch

from ddpm_lightning import schedules


def test_linear_abar_T_matches_paper_value():
    # Ho et al. 2020 §4: beta 1e-4 -> 0.02 linearly over T = 1000, which gives abar_T = 4.0358e-5.
    abar = torch.cumprod(1 - schedules.linear_betas(1000, 1e-4, 0.02), 0)
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    s = schedules.linear()
    assert s.T == 1000
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)


def test_cosine_schedule_values():
    # Nichol & Dhariwal 2021: beta_1 = 4.13e-5 at T = 1000; only beta_T reaches the 0.999 clip.
    betas = schedules.cosine_betas(1000)
    assert betas[0].item() == pytest.approx(4.13e-5, rel=1e-2)
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[-1].item() == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()
    # abar_t = f(t) / f(0) away from the clip
    t = 500
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert torch.cumprod(1 - betas, 0)[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine])
def test_posterior_is_gaussian_conditioning(make):
    """beta~_t and mu~_t (Ho et al. eq. 6-7) equal the conditional of the joint Gaussian (x_{t-1}, x_t) | x_0."""
    s = make()
    betas = s.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    for i in [1, 10, 500, 999]:  # 0-based index; the paper's t = i + 1
        var_prev, var_t = 1 - abar[i - 1], 1 - abar[i]
        cov = (1 - betas[i]).sqrt() * var_prev  # Cov(x_{t-1}, x_t | x_0)
        cond_var = var_prev - cov**2 / var_t
        # mean = sqrt(abar_{t-1}) x0 + cov / var_t (x_t - sqrt(abar_t) x0)
        coef_x0 = abar[i - 1].sqrt() - cov / var_t * abar[i].sqrt()
        coef_xt = cov / var_t
        assert s.posterior_variance[i].item() == pytest.approx(cond_var.item(), rel=1e-4)
        assert s.posterior_mean_coef1[i].item() == pytest.approx(coef_x0.item(), rel=1e-4, abs=1e-7)
        assert s.posterior_mean_coef2[i].item() == pytest.approx(coef_xt.item(), rel=1e-4)
    # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    i = 300
    assert s.posterior_variance[i].item() == pytest.approx((betas[i] * (1 - abar[i - 1]) / (1 - abar[i])).item(), rel=1e-5)
    assert s.posterior_variance[0].item() == 0.0


def test_q_sample_equals_chained_one_step_process():
    """q(x_t | x_0) in closed form has the moments of t applications of q(x_t | x_{t-1}) (eq. 2 vs eq. 4)."""
    s = schedules.linear()
    g = torch.Generator().manual_seed(0)
    n, x0 = 20000, 0.7
    x = torch.full((n,), x0, dtype=torch.float64)
    betas = s.betas.double()
    checkpoints = {99, 499, 999}
    for i in range(s.T):
        x = (1 - betas[i]).sqrt() * x + betas[i].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if i in checkpoints:
            t = torch.full((n,), i)
            closed = s.q_sample(torch.full((n,), x0), t, torch.randn(n, generator=g))
            se_mean = closed.std().item() / math.sqrt(n)
            assert abs(x.mean().item() - s.alpha(t[:1]).item() * x0) < 5 * se_mean
            assert abs(x.mean().item() - closed.mean().item()) < 7 * se_mean
            assert x.std().item() == pytest.approx(s.sigma(t[:1]).item(), rel=0.03)
            assert closed.std().item() == pytest.approx(x.std().item(), rel=0.03)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"T": 0}, "schedule.T"), ({"T": -5}, "schedule.T"), ({"T": 10.5}, "schedule.T"),
     ({"beta_end": 1.5}, "schedule.beta_end"), ({"beta_start": 0.0}, "schedule.beta_start")],
)
def test_linear_rejects_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        schedules.linear(**kwargs)


def test_discrete_schedule_rejects_betas_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        schedules.DiscreteSchedule(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="max_beta"):
        schedules.cosine(max_beta=1.0)


def test_timesteps_are_decreasing_and_leave_schedule_untouched():
    s = schedules.linear()
    before = s.alphas_cumprod.clone()
    full = s.timesteps()
    assert full == list(range(999, -1, -1))
    uni = s.timesteps(50, "uniform")
    assert len(uni) == 50 and uni[0] == 980 and uni[-1] == 0 and uni == sorted(uni, reverse=True)
    quad = s.timesteps(50, "quadratic")
    assert quad[-1] == 0 and quad == sorted(set(quad), reverse=True) and max(quad) < 1000
    # quadratic spacing is dense near t = 0 (DDIM App. D.2)
    assert quad[-2] - quad[-1] < quad[0] - quad[1]
    assert torch.equal(before, s.alphas_cumprod)
    with pytest.raises(ValueError, match="sampler.steps"):
        s.timesteps(2000)
    with pytest.raises(ValueError, match="sampler.spacing"):
        s.timesteps(10, "cubic")
