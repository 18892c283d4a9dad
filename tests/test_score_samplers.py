"""Every sampler with the exact score of a 2-D Gaussian mixture, under every schedule it is valid for, must
reproduce the mixture's weights, means and covariances; the same score scaled by 0.5 must fail."""

import functools

import pytest
import torch

from helpers.oracles import MIXTURE, SCHEDULES, mixture_z_scores
from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ald, check_compatible, ddim, ddpm, ode, pc
from helpers.oracles import BatchNoise, GaussianMixture, MixtureDenoiser

N = 2000


pytestmark = pytest.mark.usefixtures("one_thread")



CASES = [
    ("linear", ddpm, {"clip_denoised": False}),
    ("linear", ddim, {"steps": 100}),
    ("vp_sde", ddim, {"steps": 100, "eta": 1.0}),
    ("ve_sde", ddim, {"steps": 100}),
    ("ncsn", ald, {"n_steps_each": 100}),
    ("vp_sde", pc, {"steps": 500, "predictor": "reverse_diffusion"}),
    ("subvp_sde", pc, {"steps": 500, "predictor": "euler_maruyama"}),
    ("ve_sde", pc, {"steps": 500, "predictor": "ancestral"}),
    ("vp_sde", pc, {"steps": 500, "predictor": "euler_maruyama", "corrector": "none"}),
    ("linear", pc, {"steps": 500, "predictor": "reverse_diffusion"}),
    ("ncsn_fine", pc, {"steps": 100, "predictor": "ancestral"}),
    ("vp_sde", ode, {"method": "heun", "steps": 50}),
    ("vp_sde", ode, {"method": "rk45"}),
    ("subvp_sde", ode, {"method": "rk45"}),
    ("ve_sde", ode, {"method": "rk45"}),
    ("linear", ode, {"method": "rk45"}),
]


def draw(schedule_name, sampler, kwargs, scale=1.0, n=N, noise=None):
    schedule = SCHEDULES[schedule_name]()
    check_compatible(functools.partial(sampler, **kwargs), schedule)
    denoiser = MixtureDenoiser(MIXTURE, schedule, scale)
    noise = noise or BatchNoise(0)
    x_T = noise.randn_like(torch.empty(n, 2, dtype=torch.float64)) * schedule.prior_std()
    return sampler(denoiser, x_T, noise, **kwargs)


@pytest.mark.parametrize("schedule_name, sampler, kwargs", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_sampler_reproduces_the_mixture_and_a_wrong_score_fails(schedule_name, sampler, kwargs):
    z = mixture_z_scores(draw(schedule_name, sampler, kwargs))
    assert z.abs().max() < 5, z
    z_wrong = mixture_z_scores(draw(schedule_name, sampler, kwargs, scale=0.5))
    assert z_wrong.abs().max() > 5, z_wrong


def test_the_z_scores_detect_a_wrong_mixture():
    """The statistic itself: exact samples pass, samples with two weights off by 0.1 do not."""
    g = torch.Generator().manual_seed(1)
    assert mixture_z_scores(MIXTURE.sample(N, g)).abs().max() < 5
    other = GaussianMixture([0.4, 0.4, 0.2], MIXTURE.m, MIXTURE.S)
    assert mixture_z_scores(other.sample(N, g)).abs().max() > 5


@pytest.mark.parametrize("schedule_name, sampler, kwargs", [c for c in CASES if c[1] is not ddpm][:: 2] + [CASES[-1]],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_same_seed_same_sample_whatever_the_batch(schedule_name, sampler, kwargs):
    kwargs = dict(kwargs)
    if "steps" in kwargs:
        kwargs["steps"] = 20
    if sampler is ald:
        kwargs["n_steps_each"] = 5
    seeds = [0, 1, 2, 3, 4, 5]
    batch = draw(schedule_name, sampler, kwargs, n=6, noise=PerSampleNoise(seeds))
    again = draw(schedule_name, sampler, kwargs, n=6, noise=PerSampleNoise(seeds))
    alone = draw(schedule_name, sampler, kwargs, n=2, noise=PerSampleNoise([4, 5]))
    assert torch.equal(batch, again)
    assert torch.allclose(batch[4:], alone, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize(
    "schedule_name, sampler, kwargs, match",
    [
        ("vp_sde", ddpm, {}, "sampler=ddpm needs a schedule with betas"),
        ("ncsn", ddpm, {}, "sampler=ddpm"),
        ("ncsn", ode, {}, "sampler=ode needs a schedule with an SDE"),
        ("ncsn", pc, {"predictor": "euler_maruyama"}, "euler_maruyama"),
        ("vp_sde", pc, {"predictor": "heun"}, "sampler.predictor"),
        ("vp_sde", pc, {"corrector": "none", "predictor": "none"}, "nothing would be sampled"),
        ("vp_sde", ode, {"method": "rk4"}, "sampler.method"),
        ("ncsn", pc, {"steps": 1000}, r"sampler.steps=1000 must lie in \[1, schedule.T=10\]"),
        ("ncsn", ddim, {"steps": 50}, "sampler.steps=50"),
        ("ncsn", ald, {"step_lr": 0.0}, "sampler.step_lr"),
    ],
)
def test_invalid_pairs_and_options_are_refused(schedule_name, sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_compatible(functools.partial(sampler, **kwargs), SCHEDULES[schedule_name]())


def test_discrete_vp_sde_matches_ddpm_marginals():
    """The linear schedule as an SDE in index time: exp(-int b) over [0, i] equals abar_i exactly, and the
    fractional-index alpha agrees with the integer one at the steps."""
    s = schedules.linear()
    i = torch.arange(1000)
    b = s.sde(torch.ones(1000, 1), i.double())[1] ** 2
    assert torch.allclose(torch.exp(-b.double().cumsum(0)), s.alphas_cumprod.double(), rtol=1e-5)
    assert torch.allclose(s.alpha(i.double()).float(), s.alpha(i), rtol=1e-6)
    assert s.alpha(torch.tensor([10.5])) < s.alpha(torch.tensor([10])) and s.alpha(torch.tensor([10.5])) > s.alpha(torch.tensor([11]))


@pytest.mark.parametrize("name", ["vp_sde", "subvp_sde", "ve_sde"])
def test_sde_marginals_are_the_closed_forms(name):
    """Song et al. 2021 eq. 29: the mean scale solves d alpha/dt = f alpha and the variance solves
    d sigma^2/dt = 2 f sigma^2 + g^2 (with x_0 fixed); checked by finite differences."""
    s = SCHEDULES[name]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    f = s.sde(torch.ones(19, 1, dtype=torch.float64), t)[0][:, 0]  # drift coefficient f(t) (drift = f x)
    g2 = s.sde(torch.ones(19, 1, dtype=torch.float64), t)[1] ** 2
    d_alpha = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    d_var = (s.sigma(t + h) ** 2 - s.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(d_alpha, f * s.alpha(t), rtol=1e-5, atol=1e-8)
    assert torch.allclose(d_var, 2 * f * s.sigma(t) ** 2 + g2, rtol=1e-5)


def test_ncsn_levels_are_the_papers():
    s = schedules.ncsn()
    assert s.sigma(torch.tensor([9])).item() == pytest.approx(1.0) and s.sigma(torch.tensor([0])).item() == pytest.approx(0.01)
    ratios = s.sigmas[1:] / s.sigmas[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 10 ** (2 / 9)))
    with pytest.raises(ValueError, match="schedule.sigma_min"):
        schedules.ncsn(sigma_max=0.01, sigma_min=0.1)


# Gaussian data in 2-D for the default NCSN schedule (sigma_1 = 1 covers its spread).
GAUSSIAN_2D = GaussianMixture([1.0], [[0.3, -0.2]], [[[0.25, 0.0], [0.0, 0.04]]])


class FirstLevel(MixtureDenoiser):
    """The exact denoiser, remembering the first noise level it is asked about."""

    first = None

    def eps(self, x, t, **cond):
        if self.first is None:
            self.first = self.schedule.sigma(t[:1]).item()
        return super().eps(x, t, **cond)


@pytest.mark.parametrize("levels", range(1, 11))
def test_ald_starts_at_sigma_1_at_every_levels(levels):
    """Song & Ermon 2019 Algorithm 1 starts at sigma_1 whatever the number of levels visited; with the exact score,
    from levels = L / 2 on, the Tweedie-denoised samples have the data's mean and the closed-form variance
    s^4 / (s^2 + sigma_last^2) of the last level visited (within 15%: the full run itself is 7% above it)."""
    schedule = schedules.ncsn()
    denoiser = FirstLevel(GAUSSIAN_2D, schedule)
    x = ald(denoiser, BatchNoise(0).randn_like(torch.empty(4000, 2, dtype=torch.float64)), BatchNoise(1), levels=levels)
    assert denoiser.first == pytest.approx(1.0)
    if levels >= schedule.T // 2:
        s2 = torch.tensor([0.25, 0.04], dtype=torch.float64)
        sigma_last = schedule.sigmas[schedule.timesteps(levels)[-1]].double()
        assert torch.allclose(x.mean(0), GAUSSIAN_2D.m[0], atol=0.03), x.mean(0)
        assert torch.allclose(x.var(0) / (s2**2 / (s2 + sigma_last**2)), torch.ones(2, dtype=torch.float64), atol=0.15)


@pytest.mark.parametrize("steps", [501, 600, 999])
def test_ddim_with_more_than_half_the_steps_matches_ddim_1000_on_the_mixture(steps):
    """Every grid starts at t = T - 1: DDIM at 501 / 600 / 999 steps with the exact eps reproduces the mixture and
    stays within 0.1 of DDIM-1000 sample by sample (the leading grid started at t = 500 / 599 / 998)."""
    schedule = schedules.linear()
    x_T = BatchNoise(0).randn_like(torch.empty(N, 2, dtype=torch.float64))
    reference = ddim(MixtureDenoiser(MIXTURE, schedule), x_T.clone(), BatchNoise(0), steps=1000)
    x = ddim(MixtureDenoiser(MIXTURE, schedule), x_T.clone(), BatchNoise(0), steps=steps)
    assert mixture_z_scores(x).abs().max() < 5
    assert (x - reference).abs().max() < 0.1
