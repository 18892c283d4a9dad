"""DPM-Solver++(2M) and the EDM samplers (Heun, Euler, Euler ancestral) against closed forms: the exact
probability-flow solution of Gaussian data (convergence order), the Gaussian-mixture oracle (against DDIM at
equal network evaluations), DDIM itself on the same grid, and the spacing functions' end points."""

import functools

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.samplers import PerSampleNoise, check_compatible, ddim, dpmpp_2m, euler, euler_ancestral, heun
from helpers.oracles import BatchNoise, GaussianMixture, MixtureDenoiser
from helpers.oracles import MIXTURE, SCHEDULES, mixture_z_scores

pytestmark = pytest.mark.usefixtures("one_thread")

# Gaussian data N(m, diag(s^2)) in 2-D: D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m) in closed form.
MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
STD = torch.tensor([0.5, 0.2], dtype=torch.float64)
GAUSSIAN = GaussianMixture([1.0], [MEAN.tolist()], [torch.diag(STD**2).tolist()])


class Counting:
    """A denoiser wrapper counting the batched eps evaluations."""

    def __init__(self, denoiser):
        self.inner, self.schedule, self.calls = denoiser, denoiser.schedule, 0

    def eps(self, x, t, **cond):
        self.calls += 1
        return self.inner.eps(x, t, **cond)

    def x0(self, x, t, **cond):
        return self.x0_from_eps(x, t, self.eps(x, t, **cond))

    def x0_from_eps(self, x, t, eps):
        return self.inner.x0_from_eps(x, t, eps)


def exact_output(schedule, x_T, sigmas):
    """The probability-flow ODE of Gaussian data in EDM form, x^(sigma) = m + (x^_T - m) sqrt((s^2 + sigma^2) /
    (s^2 + sigma_max^2)), solved exactly from sigma_max to sigma_min, then the samplers' last step D(x^; sigma_min)."""
    sigma_max, sigma_min = sigmas[0], sigmas[-2]
    t_max = schedule.t_of_noise_level(torch.tensor(sigma_max, dtype=torch.float64)).reshape(1)
    x_hat = x_T / schedule.alpha(t_max).double()
    x_min = MEAN + (x_hat - MEAN) * ((STD**2 + sigma_min**2) / (STD**2 + sigma_max**2)).sqrt()
    return MEAN + STD**2 / (STD**2 + sigma_min**2) * (x_min - MEAN)


@pytest.mark.parametrize("schedule_name", ["linear", "vp_sde", "ve_sde", "ncsn"])
@pytest.mark.parametrize("sampler, order", [(euler, 1), (heun, 2), (dpmpp_2m, 2)], ids=["euler", "heun", "dpmpp_2m"])
def test_converges_to_the_exact_flow_with_its_order(schedule_name, sampler, order):
    """Error against the closed-form solution over 16-128 steps (Karras spacing): the fitted slope of log error
    against log steps is -1 for Euler and -2 for Heun and DPM-Solver++(2M) (4x smaller error per halving)."""
    schedule = SCHEDULES[schedule_name]()
    denoiser = MixtureDenoiser(GAUSSIAN, schedule)
    x_T = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * schedule.prior_std()
    steps, errors = [16, 32, 64, 128], []
    for n in steps:
        sigmas = schedules.noise_levels(schedule, n, "karras").tolist()
        out = sampler(denoiser, x_T.clone(), None, steps=n, spacing="karras")
        errors.append((out - exact_output(schedule, x_T, sigmas)).abs().max().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(-order, abs=0.2), (slope, errors)


def chi2(x):
    """Sum of squared z-scores of the mixture's weights, means and covariances (27 statistics; about 27 for exact
    samples)."""
    return (mixture_z_scores(x) ** 2).sum().item()


def test_few_step_solvers_beat_ddim_on_the_mixture_at_equal_nfe():
    """DDPM's linear schedule, the exact mixture eps, 8000 samples from the same x_T. At 10 and 20 network
    evaluations DPM-Solver++(2M) reproduces the mixture's weights, means and covariances far better than DDIM
    (measured chi2 945 / 122 against 2657 / 762). Heun (2 evaluations a step) overtakes DDIM only later: its
    large steps through sigma ~ data scale overshoot (chi2 at 10 / 20 / 80 NFE: 20510 / 3825 / 51 against DDIM's
    2657 / 762 / 71), so it is compared at 80."""
    schedule = schedules.linear()
    denoiser = Counting(MixtureDenoiser(MIXTURE, schedule))
    x_T = BatchNoise(0).randn_like(torch.empty(8000, 2, dtype=torch.float64))

    def run(sampler, nfe, **kwargs):
        denoiser.calls = 0
        x = sampler(denoiser, x_T.clone(), None, **kwargs)
        assert denoiser.calls == nfe, (sampler.__name__, denoiser.calls)
        return chi2(x)

    for nfe in (10, 20):
        assert run(dpmpp_2m, nfe, steps=nfe) < 0.5 * run(ddim, nfe, steps=nfe)
    assert run(heun, 79, steps=40) < run(ddim, 80, steps=80)


def ddim_grid(schedule, steps, spacing=schedules.DEFAULT_SPACING):
    """The noise levels DDIM visits with `steps` steps of the given spacing (then the data, 0)."""
    ts = torch.tensor(schedule.timesteps(steps, spacing), dtype=torch.float64)
    return schedule.noise_level(ts).double().tolist() + [0.0]


def trajectory(sampler, denoiser, x_T, noise, **kwargs):
    states = []
    sampler(denoiser, x_T.clone(), noise, callback=lambda k, x: states.append(x.clone()), **kwargs)
    return states


def test_dpmpp_first_step_is_ddim_and_euler_is_ddim_on_its_grid():
    """On DDIM's own grid: DPM-Solver++(2M)'s first step is samplers.ddim's first step (eta = 0); every Euler step
    is a DDIM step (Karras et al. §3), and Euler ancestral with eta = 1 is DDIM with eta = 1, noise included.
    (To 1e-5: DDIM reads alpha and sigma from the float32 buffers, the noise-level samplers interpolate log abar.)"""
    schedule = schedules.linear()
    denoiser = MixtureDenoiser(MIXTURE, schedule)
    x_T = BatchNoise(0).randn_like(torch.empty(500, 2, dtype=torch.float64))
    sigmas = ddim_grid(schedule, 10, "leading")  # from t = 900, where the second step is visibly second order
    ref = trajectory(ddim, denoiser, x_T, None, steps=10, spacing="leading")
    dpm = trajectory(dpmpp_2m, denoiser, x_T, None, sigmas=sigmas)
    torch.testing.assert_close(dpm[0], ref[0], rtol=1e-5, atol=1e-5)
    assert (dpm[1] - ref[1]).abs().max() > 1e-3  # the second step is second order, no longer DDIM
    for a, b in zip(trajectory(euler, denoiser, x_T, None, sigmas=sigmas), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref1 = trajectory(ddim, denoiser, x_T, BatchNoise(1), steps=10, eta=1.0, spacing="leading")
    for a, b in zip(trajectory(euler_ancestral, denoiser, x_T, BatchNoise(1), sigmas=sigmas, eta=1.0), ref1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "ncsn", "vp_sde", "subvp_sde", "ve_sde"])
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_spacings_run_from_sigma_max_to_sigma_min(schedule_name, spacing):
    schedule = SCHEDULES[schedule_name]()
    t_max, t_min = schedules.time_range(schedule)
    sigma_max, sigma_min = schedule.noise_level(torch.tensor([t_max, t_min], dtype=torch.float64)).tolist()
    levels = schedules.noise_levels(schedule, 7, spacing)
    assert levels[0] == sigma_max and levels[-2] == sigma_min and levels[-1] == 0 and len(levels) == 8
    assert bool((levels[1:] < levels[:-1]).all())
    # the time of each level is the schedule's own: noise_level(t_of_noise_level(s)) = s
    torch.testing.assert_close(schedule.noise_level(schedule.t_of_noise_level(levels[:-1])).double(), levels[:-1], rtol=1e-9, atol=0)
    if spacing == "karras":  # Karras et al. eq. 5 at i = 3 of N = 7, rho = 7
        r = 1 / 7
        assert levels[3].item() == pytest.approx((sigma_max**r + 3 / 6 * (sigma_min**r - sigma_max**r)) ** 7, rel=1e-12)
    if spacing == "log_snr":  # uniform in lambda = -log sigma
        assert torch.diff(levels[:-1].log()).std().item() < 1e-12


def test_time_of_a_noise_level_is_exact():
    """The discrete schedule's inverse undoes its interpolation of log abar (at and between the trained steps, and
    to float32 precision from the integer steps' buffers); NCSN's lands on its levels."""
    linear = schedules.linear()
    t = torch.tensor([0, 1, 10, 10.25, 500, 998.5, 999], dtype=torch.float64)
    torch.testing.assert_close(linear.t_of_noise_level(linear.noise_level(t)), t, rtol=0, atol=1e-9)
    steps = torch.tensor([0, 1, 10, 500, 999])
    assert torch.allclose(linear.t_of_noise_level(linear.noise_level(steps).double()), steps.double(), atol=1e-3)
    ncsn = schedules.ncsn()
    assert torch.allclose(ncsn.t_of_noise_level(ncsn.sigmas.double()), torch.arange(10, dtype=torch.float64), atol=1e-5)
    # the generic bisection of the base class agrees with the closed forms
    vp = schedules.VPSDE()
    levels = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(schedules.Schedule.t_of_noise_level(vp, levels), vp.t_of_noise_level(levels))


@pytest.mark.parametrize(
    "sampler, kwargs, match",
    [
        (dpmpp_2m, {"steps": 0}, "sampler.steps"),
        (heun, {"steps": 2.5}, "sampler.steps"),
        (euler, {"spacing": "cosine"}, "sampler.spacing"),
        (dpmpp_2m, {"spacing": "karras", "rho": 0}, "sampler.rho"),
        (dpmpp_2m, {"s_churn": 10.0}, "sampler.s_churn"),
        (euler_ancestral, {"s_churn": 10.0}, "sampler.s_churn"),
        (heun, {"s_churn": -1.0}, "sampler.s_churn"),
        (heun, {"s_tmin": 2.0, "s_tmax": 1.0}, "sampler.s_tmin"),
        (euler_ancestral, {"eta": -0.5}, "sampler.eta"),
        (heun, {"sigmas": [2.0, 1.0]}, "sampler.sigmas"),
        (dpmpp_2m, {"sigmas": [1.0, 2.0, 0.0]}, "sampler.sigmas"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_compatible(functools.partial(sampler, **kwargs), schedules.linear())


@pytest.mark.parametrize(
    "sampler, kwargs",
    [(heun, {"steps": 8, "s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0}), (euler_ancestral, {"steps": 8})],
    ids=["heun_churn", "euler_ancestral"],
)
def test_stochastic_samplers_same_seed_same_sample_whatever_the_batch(sampler, kwargs):
    schedule = schedules.linear()
    denoiser = MixtureDenoiser(MIXTURE, schedule)
    noise = PerSampleNoise(range(6))
    whole = sampler(denoiser, noise.randn((2,), torch.float64), noise, **kwargs)
    part = PerSampleNoise(range(3, 6))
    torch.testing.assert_close(sampler(denoiser, part.randn((2,), torch.float64), part, **kwargs), whole[3:])
    assert not torch.allclose(whole[0], whole[1])


def test_churn_and_ancestral_noise_still_sample_the_mixture():
    """Stochastic samplers (Karras et al. Algorithm 2 with churn; Euler ancestral) are correct samplers: with
    enough steps the mixture's statistics match (|z| < 5); the same with half the score fails."""
    schedule = schedules.linear()
    x_T = BatchNoise(0).randn_like(torch.empty(2000, 2, dtype=torch.float64))
    churn = {"steps": 64, "s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 10.0}
    for sampler, kwargs in ((heun, churn), (euler_ancestral, {"steps": 200})):
        z = mixture_z_scores(sampler(MixtureDenoiser(MIXTURE, schedule), x_T.clone(), BatchNoise(1), **kwargs))
        assert z.abs().max() < 5, (sampler.__name__, z)
        z = mixture_z_scores(sampler(MixtureDenoiser(MIXTURE, schedule, 0.5), x_T.clone(), BatchNoise(1), **kwargs))
        assert z.abs().max() > 5, (sampler.__name__, z)


def test_quickstart_and_grids_sample_with_dpmpp_2m_10_steps():
    """The choice of benchmarks/sampler_nfe.py (README): DPM-Solver++(2M), 10 steps, for the quickstart and grids."""
    from helpers.config import compose_cfg

    for experiment in ("quickstart", "digits"):
        cfg = compose_cfg([f"experiment={experiment}"], tiny=False)
        for sampler in (cfg.sampler, cfg.callbacks.samples.sampler):
            assert sampler._target_ == "ddpm_lightning.diffusion.samplers.dpmpp_2m" and sampler.steps == 10
