"""Likelihoods against closed forms: the ODE log-density of mixture samples, the DDPM bound of Gaussian data
with its exact eps, L_T of the linear schedule, and the discretised decoder."""

import math

import pytest
import torch

from ddpm_lightning.diffusion import schedules
from ddpm_lightning.data.digits import load_digits_uint8
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.images import to_model_range
from ddpm_lightning.diffusion.likelihood import discretized_gaussian_log_likelihood, ode_logp, prior_kl, vlb_terms
from ddpm_lightning.diffusion.samplers import PerSampleNoise
from ddpm_lightning.diffusion.samplers.score import time_range
from helpers.oracles import GaussianEps, MixtureDenoiser
from helpers.oracles import MIXTURE, SCHEDULES


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["vp_sde", "ve_sde", "linear"])
def test_ode_log_density_of_mixture_samples_is_exact(name):
    """log p_{t_min}(x) from the probability-flow ODE (exact trace) equals the mixture's closed form."""
    # VE with its default sigma_max = 50: with a smaller one the prior N(0, sigma_max^2) is visibly not p_T
    schedule = schedules.VESDE() if name == "ve_sde" else SCHEDULES[name]()
    x = MIXTURE.sample(64, torch.Generator().manual_seed(0))
    logp, nfe = ode_logp(MixtureDenoiser(MIXTURE, schedule), x, PerSampleNoise(range(64)), trace="exact", rtol=1e-6, atol=1e-6)
    t_min = torch.full((64,), time_range(schedule)[1], dtype=torch.float64)
    exact = MIXTURE.log_prob(x, schedule.alpha(t_min), schedule.sigma(t_min))
    err = (logp - exact).abs()
    print(f"{name}: ODE log-density error mean {err.mean():.2e} max {err.max():.2e} nats, {nfe} evaluations")
    assert err.max() < 2e-2


def test_hutchinson_estimate_is_unbiased_and_a_wrong_score_is_not():
    schedule = schedules.VPSDE()
    x = MIXTURE.sample(400, torch.Generator().manual_seed(1))
    t_min = torch.full((400,), schedule.t_min, dtype=torch.float64)
    exact = MIXTURE.log_prob(x, schedule.alpha(t_min), schedule.sigma(t_min))
    for scale, ok in ((1.0, True), (0.5, False)):
        logp, _ = ode_logp(MixtureDenoiser(MIXTURE, schedule, scale), x, PerSampleNoise(range(400)), rtol=1e-4, atol=1e-4)
        d = logp - exact
        z = d.mean() / (d.std() / 20)
        assert (abs(z) < 4 and abs(d.mean()) < 0.1) == ok, (scale, d.mean(), z)


def test_vlb_of_gaussian_data_with_the_exact_eps_is_its_closed_form():
    """Data N(m, s^2) per dimension, eps exact: E L_{t-1} = KL of the variances + coef1^2 Var(x_0 | x_t) / (2 var_p)
    with Var(x_0 | x_t) = s^2 sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2), and E L_T = KL(N(alpha m, alpha^2 s^2 +
    sigma^2) averaged over x_0 || N(0, 1)) in closed form."""
    m, s, B, D = 0.3, 0.5, 64, 16
    sch = schedules.linear()
    x0 = m + s * torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    terms = vlb_terms(Denoiser(GaussianEps(sch, m, s), sch), x0, PerSampleNoise(range(B)), "fixed_large", clip_denoised=False)
    a2, v = sch.alphas_cumprod.double(), 1 - sch.alphas_cumprod.double()
    var_p = sch.betas.double()[1:]
    var_q = sch.posterior_variance.double()[1:]
    post = s**2 * v[1:] / (a2[1:] * s**2 + v[1:])
    kl = 0.5 * (var_p.log() - var_q.log() + var_q / var_p - 1 + sch.posterior_mean_coef1.double()[1:] ** 2 * post / var_p)
    expected = D * kl.sum().item()
    got = terms["L_1:T-1"]
    assert got.mean().item() == pytest.approx(expected, abs=4 * got.std().item() / B**0.5 + 1e-3)
    expected_T = D * 0.5 * (-1 - v[-1].log() + v[-1] + a2[-1] * (m**2 + s**2)).item()
    assert terms["L_T"].mean().item() == pytest.approx(expected_T, rel=0.2)


def test_vlb_gets_worse_with_a_wrong_eps():
    m, s, B, D = 0.3, 0.5, 16, 16
    sch = schedules.linear(T=200)
    x0 = m + s * torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    good, bad = (vlb_terms(Denoiser(GaussianEps(sch, m, s, scale), sch), x0, PerSampleNoise(range(B)), clip_denoised=False)
                 for scale in (1.0, 0.5))
    diff = bad["L_1:T-1"] - good["L_1:T-1"]  # the same x_t for both: a paired comparison
    assert diff.min() > 0 and diff.mean() > 5


def test_prior_term_of_the_linear_schedule_is_about_1e_5_bits_per_dim():
    """Ho et al. 2020 §4: L_T = D_KL(q(x_T | x_0) || N(0, I)) is about 1e-5 bits/dim."""
    x0 = to_model_range(load_digits_uint8(8)[0][:256])
    bpd = prior_kl(schedules.linear(), x0) / (x0[0].numel() * math.log(2))
    print(f"L_T of the linear schedule on digits: {bpd.mean():.2e} bits/dim")
    assert 3e-6 < bpd.mean().item() < 3e-5


def test_discretized_decoder_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in ((0.1, math.log(0.01)), (-0.97, math.log(0.2)), (0.5, math.log(0.002))):
        p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-4)
    # Wide Gaussian: the bin mass is the density times the bin width 2/255.
    x = torch.tensor([0.2])
    logp = discretized_gaussian_log_likelihood(x, torch.tensor(0.0), torch.tensor(math.log(0.3)))
    density = torch.distributions.Normal(0.0, 0.3).log_prob(x) + math.log(2 / 255)
    assert logp.item() == pytest.approx(density.item(), abs=1e-3)


def test_discretized_decoder_matches_scipy_in_the_far_tails():
    """Every bin in log space: log P(x - 1/255 < X < x + 1/255), X ~ N(mean, scale^2), the edge bins open, equals
    scipy's two-sided log-CDF at means far outside the data range and tiny or huge scales. (With interior bins
    floored at 1e-12, mean 0.5 and std 0.01 gave 27.63 nats at x = 0 against 1235.29; x = -1 gave 11197.18.)"""
    stats = pytest.importorskip("scipy.stats")
    if not hasattr(stats, "Normal"):
        pytest.skip("scipy >= 1.15 has the two-sided Normal.logcdf")
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    x = levels[[0, 1, 2, 64, 127, 128, 191, 253, 254, 255]]
    for mean in (-30.0, -3.0, -1.0, 0.0, 0.5, 0.999, 4.0, 30.0):
        for scale in (1e-4, 0.01, 0.3, 1.0, 20.0):
            ours = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                                       torch.tensor(math.log(scale), dtype=torch.float64))
            X = stats.Normal(mu=mean, sigma=scale)
            for xi, o in zip(x.tolist(), ours.tolist()):
                lo = -math.inf if xi < -0.999 else xi - 1 / 255
                hi = math.inf if xi > 0.999 else xi + 1 / 255
                want = complex(X.logcdf(lo, hi)).real
                assert o == pytest.approx(want, rel=1e-9, abs=1e-9), (mean, scale, xi)
    nll = -discretized_gaussian_log_likelihood(torch.tensor([-1.0, 0.0]), torch.tensor(0.5), torch.tensor(math.log(0.01)))
    assert nll.tolist() == pytest.approx([11197.18, 1235.29], abs=0.01)
