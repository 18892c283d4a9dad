"""The seed's physics (ddpm_lightning.physics.processes): random walk, master equation, Fokker-Planck, OU, and DDPM's
forward process as a VP SDE, each against its closed form."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_lightning.physics import processes as P
from ddpm_lightning.diffusion import schedules as S

# A 1-D two-mode data density for the VP SDE tests.
W, M, SD = [0.3, 0.7], [-0.6, 0.5], [0.1, 0.15]


def test_random_walk_msd_slope_is_2D():
    p = q = 0.3
    x = P.lattice_random_walk(50_000, 200, p, q, delta=0.5, seed=0)
    t = np.arange(201) * 2.0  # tau = 2
    slope = P.fit_slope(t, P.mean_squared_displacement(x))
    D = P.diffusion_coefficient(p, q, delta=0.5, tau=2.0)
    assert D == pytest.approx(0.3 * 0.25 / 2)
    assert slope == pytest.approx(2 * D, rel=0.02)


def test_random_walk_drift_velocity():
    p, q, delta, tau = 0.15, 0.35, 0.5, 2.0
    x = P.lattice_random_walk(50_000, 200, p, q, delta=delta, seed=1)
    t = np.arange(201) * tau
    v = P.fit_slope(t, x.mean(axis=1))
    assert P.drift_velocity(p, q, delta, tau) == pytest.approx(0.05)
    assert v == pytest.approx(0.05, rel=0.02)
    assert P.fit_slope(t, -x.mean(axis=1)) < 0  # a walk with q > p moves right, not left


def test_random_walk_histogram_is_the_master_equation():
    p, q, n = 0.2, 0.3, 40
    x = P.lattice_random_walk(100_000, n, p, q, seed=2)
    C0 = np.zeros(2 * n + 1)
    C0[n] = 1
    C = P.master_equation(C0, p, q, n)[-1]
    counts = np.bincount((x[-1] + n).astype(int), minlength=2 * n + 1) / x.shape[1]
    assert np.abs(counts - C).sum() < 0.03
    assert np.abs(counts - np.roll(C, 3)).sum() > 0.3  # a shifted answer would be caught


def test_master_equation_split_form_is_the_jump_form():
    rng = np.random.default_rng(0)
    C = rng.random(50)
    p, q = 0.1, 0.45
    direct = q * np.roll(C, 1) + p * np.roll(C, -1) + (1 - p - q) * C
    np.testing.assert_allclose(P.master_equation_step(C, p, q), direct, rtol=1e-14, atol=1e-15)


def test_master_equation_conserves_mass_and_approaches_the_gaussian():
    p = q = 0.3
    n = 400
    C0 = np.zeros(2 * n + 1)
    C0[n] = 1
    C = P.master_equation(C0, p, q, n)
    assert np.abs(C.sum(axis=1) - 1).max() < 1e-12
    sites = np.arange(-n, n + 1)
    D = P.diffusion_coefficient(p, q)
    errors = [np.abs(C[k] - P.gaussian_solution(sites, k, D)).sum() for k in (5, 20, 80, 320)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 2e-3
    # with the drift, the Gaussian moves at v = (q - p) delta / tau
    p, q = 0.25, 0.35
    C = P.master_equation(C0, p, q, n)[n]
    mean = (sites * C).sum()
    assert mean == pytest.approx(P.drift_velocity(p, q) * n, rel=1e-12)
    G = P.gaussian_solution(sites, n, P.diffusion_coefficient(p, q), P.drift_velocity(p, q))
    assert np.abs(C - G).sum() < 0.02


def test_bad_jump_probabilities_error():
    with pytest.raises(ValueError, match="p=0.7, q=0.5"):
        P.lattice_random_walk(10, 10, 0.7, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Fokker-Planck and Ornstein-Uhlenbeck

GAMMA, SIGMA = 1.0, 0.8
OU_X = np.linspace(-4, 4, 801)


def ou_fokker_planck(times, B_factor=0.5):
    f0 = P.normal_density(OU_X, 2.0, 0.05)
    return P.fokker_planck(f0, OU_X, lambda x, t: -GAMMA * x, lambda x, t: B_factor * SIGMA**2 + 0 * x, times, dt=0.02)


def test_fokker_planck_conserves_mass_and_matches_the_ou_closed_form():
    times = [0.0, 0.5, 1.0, 3.0, 12.0]
    F = ou_fokker_planck(times)
    h = OU_X[1] - OU_X[0]
    assert np.abs(F.sum(axis=1) * h - 1).max() < 1e-6
    for f, t in zip(F, times):
        exact = P.normal_density(OU_X, P.ou_mean(2.0, t, GAMMA), P.ou_variance(t, GAMMA, SIGMA, var0=0.05))
        assert P.l1_distance(f, exact, OU_X) < 1e-3, t
    stationary = P.ou_stationary_density(OU_X, GAMMA, SIGMA)
    assert P.l1_distance(F[-1], stationary, OU_X) < 1e-3
    assert P.l1_distance(F[1], stationary, OU_X) > 0.5  # not there yet at t = 0.5


def test_fokker_planck_convention_B_is_half_sigma_squared():
    """The seed's B = sigma^2 doubles the stationary variance to sigma^2 / gamma: the test must see it."""
    (f,) = ou_fokker_planck([0.0, 12.0], B_factor=1.0)[-1:]
    assert P.l1_distance(f, P.ou_stationary_density(OU_X, GAMMA, SIGMA), OU_X) > 0.1
    assert P.l1_distance(f, P.normal_density(OU_X, 0.0, SIGMA**2 / GAMMA), OU_X) < 1e-3
    A, B = P.fokker_planck_coefficients(lambda x, t: -GAMMA * x, lambda x, t: SIGMA + 0 * x)
    assert B(np.zeros(1), 0.0)[0] == pytest.approx(SIGMA**2 / 2)


def test_euler_maruyama_histogram_matches_the_fokker_planck_solution():
    times = [0.0, 0.5, 12.0]
    F = ou_fokker_planck(times)
    x0 = 2.0 + np.sqrt(0.05) * np.random.default_rng(0).standard_normal(50_000)
    coarse = OU_X[::10]
    for f, t0, t1 in ((F[1], 0.0, 0.5), (F[2], 0.5, 12.0)):
        x0 = P.euler_maruyama(x0, lambda x, t: -GAMMA * x, lambda x, t: SIGMA, t0, t1, n_steps=int((t1 - t0) / 0.01))
        hist = P.density_histogram(x0, coarse)
        assert P.l1_distance(hist, f[::10], coarse) < 0.04, t1
    assert x0.var() == pytest.approx(SIGMA**2 / (2 * GAMMA), rel=0.03)


# ---------------------------------------------------------------------------------------------------------
# DDPM's forward process: the schedules' SDEs

VP_X = np.linspace(-5, 5, 1001)


@pytest.mark.parametrize(
    "schedule, times, dt",
    [
        (S.linear(), [-1, 0, 50, 200, 999], 1.0),  # discrete schedules run in index time from the data at -1
        (S.cosine(), [-1, 0, 50, 500, 999], 0.5),
        (S.VPSDE(), [0.0, 0.05, 0.2, 1.0], 2e-3),
    ],
    ids=["linear", "cosine", "vp_sde"],
)
def test_fokker_planck_of_our_vp_sdes_is_the_closed_form_marginal(schedule, times, dt):
    A, B = P.fokker_planck_coefficients(*P.vp_sde(schedule))
    F = P.fokker_planck(P.mixture_density(VP_X, W, M, SD), VP_X, A, B, times, dt)
    h = VP_X[1] - VP_X[0]
    assert np.abs(F.sum(axis=1) * h - 1).max() < 1e-6
    for f, t in zip(F[1:], times[1:]):
        alpha, sigma = P.marginal_scales(schedule, t)
        assert P.l1_distance(f, P.mixture_density(VP_X, W, M, SD, alpha, sigma), VP_X) < 1e-2, t
    # the end of the forward process is (almost) the prior N(0, 1); the middle is not
    assert P.l1_distance(F[-1], P.normal_density(VP_X, 0.0, 1.0), VP_X) < 0.02
    assert P.l1_distance(F[2], P.normal_density(VP_X, 0.0, 1.0), VP_X) > 0.2


@pytest.mark.parametrize("schedule, start, end", [(S.VPSDE(), 1.0, 1e-3), (S.linear(), 999.0, 0.0)], ids=["vp_sde", "linear"])
def test_integrating_back_with_the_exact_score_recovers_the_mixture(schedule, start, end):
    f, g = P.vp_sde(schedule)
    score = P.mixture_score_of(schedule, W, M, SD)
    alpha, sigma = P.marginal_scales(schedule, start)
    assert alpha < 0.01  # the start is pure noise
    x_T = sigma * np.random.default_rng(0).standard_normal(4000)
    sde = P.euler_maruyama(x_T, P.reverse_sde_drift(f, g, score), g, start, end, n_steps=400, seed=1)
    ode = P.heun(x_T, P.probability_flow_drift(f, g, score), start, end, n_steps=200)
    for x in (sde, ode):
        left = x < (M[0] + M[1]) / 2
        assert left.mean() == pytest.approx(W[0], abs=0.03)
        assert x[left].mean() == pytest.approx(M[0], abs=0.02)
        assert x[~left].mean() == pytest.approx(M[1], abs=0.02)
        assert x[left].std() == pytest.approx(SD[0], rel=0.1)
        assert x[~left].std() == pytest.approx(SD[1], rel=0.1)


def test_mixture_score_is_the_derivative_of_the_log_density():
    x = np.linspace(-2, 2, 41)
    h = 1e-5
    lp = lambda y: np.log(P.mixture_density(y, W, M, SD, 0.7, 0.5))  # noqa: E731
    np.testing.assert_allclose(P.mixture_score(x, W, M, SD, 0.7, 0.5), (lp(x + h) - lp(x - h)) / (2 * h), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_figures_command_draws_the_five_small_figures(tmp_path):
    from ddpm_lightning.physics import figures as physics_figures

    numbers = physics_figures.main(["--out", str(tmp_path)])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["1_random_walk.png", "2_msd.png", "3_ornstein_uhlenbeck.png", "4_forward_vp.png", "5_reverse.png"]
    assert all((tmp_path / p).stat().st_size < 100_000 for p in pngs)
    assert abs(numbers["msd"]["msd_slope_rel_error"]) < 0.02
    assert numbers["forward_vp"]["max_l1_fp_vs_closed_form"] < 1e-2
    assert numbers["reverse"]["reverse SDE"]["weight_left"] == pytest.approx(W[0], abs=0.03)
    assert (tmp_path / "numbers.json").is_file()


@pytest.mark.parametrize("schedule", [S.linear(), S.cosine()], ids=["linear", "cosine"])
def test_discrete_marginal_scales_start_from_the_data_at_t_minus_1(schedule):
    """In index time the discrete process starts from the data at t = -1 (alpha 1, sigma 0), and its first step
    (-1, 0] follows the SDE's exact marginal: log abar linear from 0 to log abar_0."""
    assert P.marginal_scales(schedule, -1.0) == (1.0, 0.0)
    assert P.marginal_scales(schedule, -5.0) == (1.0, 0.0)
    abar0 = schedule.alphas_cumprod.double()[0].item()
    alpha, sigma = P.marginal_scales(schedule, -0.5)
    assert alpha == pytest.approx(abar0**0.25, rel=1e-12) and sigma == pytest.approx((1 - abar0**0.5) ** 0.5, rel=1e-9)
    alpha0, sigma0 = P.marginal_scales(schedule, 0.0)
    assert alpha0 == pytest.approx(abar0**0.5, rel=1e-12) and sigma0 == pytest.approx((1 - abar0) ** 0.5, rel=1e-6)
