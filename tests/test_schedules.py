"""Schedules against the papers' values and the closed forms of Ho et al. 2020 §2."""

import math

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import schedules


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


# ----------------------------------------------------------------------------------- discrete time grids (spacing)


def _is_grid(seq, T, steps):
    return len(seq) == steps and len(set(seq)) == steps and seq == sorted(seq, reverse=True) and 0 <= seq[-1] and seq[0] <= T - 1


@pytest.mark.parametrize("T", [1000, 1, 2, 7, 10])
def test_every_spacing_gives_exactly_steps_distinct_decreasing_indices(T):
    """Lin et al. 2024 Table 2: for every steps in [1, T], `steps` distinct decreasing indices; trailing and linspace
    start at T - 1 (linspace also ends at 0), leading starts at (steps - 1)(T // steps), quadratic tops at 0.8 T."""
    for steps in range(1, T + 1):
        grids = {name: schedules.index_timesteps(T, steps, name) for name in schedules.DISCRETE_SPACINGS}
        for name, seq in grids.items():
            assert _is_grid(seq, T, steps), (name, steps, seq[:5], seq[-5:])
        assert grids["trailing"][0] == T - 1 and grids["linspace"][0] == T - 1
        assert steps == 1 or grids["linspace"][-1] == 0
        assert grids["leading"][0] == (steps - 1) * (T // steps) and grids["leading"][-1] == 0
        assert grids["quadratic"][0] == max(4 * T // 5, steps - 1)
        if steps == T:
            assert all(seq == list(range(T - 1, -1, -1)) for seq in grids.values())


def test_default_spacing_is_trailing_and_uniform_is_the_old_leading_grid():
    s = schedules.linear()
    assert schedules.DEFAULT_SPACING == "trailing" and s.timesteps(50) == s.timesteps(50, "trailing")
    assert s.timesteps(50) == list(range(999, 0, -20))  # 999, 979, ..., 19
    for steps in (1, 3, 50, 333, 501, 600, 999):
        old = [i * (1000 // steps) for i in range(steps)][::-1]  # the formula `uniform` had
        assert s.timesteps(steps, "uniform") == s.timesteps(steps, "leading") == old
    assert s.timesteps(600, "leading")[0] == 599 and s.timesteps(600)[0] == 999


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_spacings_match_diffusers_timestep_spacing(spacing):
    """The same indices as diffusers' DDIMScheduler with timestep_spacing=spacing (steps_offset 0). diffusers'
    trailing grid comes from a float arange that can overshoot by one entry, index -1 (e.g. 499 steps): ours stops
    at `steps` entries."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    for steps in range(2, 1001):
        sched.set_timesteps(steps)
        theirs = sched.timesteps.tolist()
        if len(theirs) == steps + 1 and spacing == "trailing":
            assert theirs.pop() == -1
        assert schedules.index_timesteps(1000, steps, spacing) == theirs, steps


def test_quadratic_is_ddims_grid_where_its_floor_is_distinct():
    """Song et al. 2021 App. D.2 / their code: floor(c i^2), c = 0.8 T / (steps - 1)^2. Where the floor repeats
    (small i) the grid counts up one index at a time until the floor overtakes it, then follows the floor."""
    for steps in (10, 20, 50, 100, 500, 801, 900, 1000):
        seq = schedules.index_timesteps(1000, steps, "quadratic")[::-1]
        floor = [int(v) for v in np.linspace(0, np.sqrt(800), steps) ** 2]  # the DDIM code's expression
        k = next((i for i in range(steps) if floor[i] > i), steps)  # where the floor overtakes 0, 1, 2, ...
        assert seq[:k] == list(range(k))
        assert seq[k:] == floor[k:]
    assert schedules.index_timesteps(1000, 10, "quadratic")[::-1] == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert len(schedules.index_timesteps(1000, 100, "quadratic")) == 100  # was 96 before the lift
    assert len(schedules.index_timesteps(1000, 500, "quadratic")) == 500  # was 422


def test_bad_spacing_and_steps_name_the_key():
    with pytest.raises(ValueError, match="sampler.spacing='cubic'.*trailing"):
        schedules.index_timesteps(1000, 10, "cubic")
    with pytest.raises(ValueError, match="sampler.spacing"):
        schedules.index_timesteps(1000, None, "cubic")
    for steps in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="sampler.steps"):
            schedules.index_timesteps(1000, steps)
