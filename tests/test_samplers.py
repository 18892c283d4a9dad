"""Samplers with the exact eps of Gaussian data: they must reproduce the data's mean and standard deviation."""

import pytest
import torch

from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.nets import UNet
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ddim, ddpm
from helpers.oracles import GaussianEps

MEAN, STD = 0.3, 0.5
N, DIM = 500, 64  # 32,000 values: standard error of the std about 0.002


def draw(sampler, scale=1.0, n=N, **kwargs):
    schedule = schedules.linear()
    denoiser = Denoiser(GaussianEps(schedule, MEAN, STD, scale), schedule)
    noise = PerSampleNoise(range(n))
    return sampler(denoiser, noise.randn((DIM,)), noise, **kwargs)


CASES = [
    (ddpm, {"variance": "fixed_large", "clip_denoised": False}),
    (ddpm, {"variance": "fixed_small", "clip_denoised": False}),
    (ddim, {"steps": 1000, "eta": 0.0}),
    (ddim, {"steps": 1000, "eta": 1.0}),
    (ddim, {"steps": 100, "eta": 0.0, "spacing": "quadratic"}),
]


@pytest.mark.parametrize("sampler, kwargs", CASES)
def test_sampler_reproduces_gaussian_data(sampler, kwargs):
    x = draw(sampler, **kwargs)
    assert x.mean().item() == pytest.approx(MEAN, abs=0.015)
    assert x.std().item() == pytest.approx(STD, rel=0.04)


@pytest.mark.parametrize("sampler, kwargs", CASES[::2])
def test_wrong_eps_fails_the_same_check(sampler, kwargs):
    x = draw(sampler, scale=0.5, n=500, **kwargs)
    assert abs(x.std().item() - STD) > 0.1 or abs(x.mean().item() - MEAN) > 0.1


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    """DDIM with eta = 1 over all T steps is DDPM ancestral sampling with sigma^2 = beta~ (DDIM §4.1)."""
    a = draw(ddim, n=64, steps=1000, eta=1.0)
    b = draw(ddpm, n=64, variance="fixed_small", clip_denoised=False)
    assert torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("sampler, kwargs", [(ddpm, {}), (ddim, {"steps": 5, "eta": 1.0})])
def test_same_seed_same_image_whatever_the_batch(sampler, kwargs):
    torch.manual_seed(0)
    schedule = schedules.linear(T=20) if sampler is ddpm else schedules.linear()
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8, dropout=0.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    denoiser = Denoiser(net.eval(), schedule)

    def run(seeds):
        noise = PerSampleNoise(seeds)
        return sampler(denoiser, noise.randn((1, 8, 8)), noise, **kwargs)

    batch = run([10, 11, 12, 13])
    assert torch.allclose(run([12]), batch[2:3], atol=1e-5)
    assert torch.allclose(run([13, 10]), batch[[3, 0]], atol=1e-5)
    assert torch.equal(run([10, 11, 12, 13]), batch)
    assert not torch.allclose(batch[0], batch[1])


def test_ddpm_refuses_a_schedule_without_ddpm_buffers():
    class NoBuffers:
        T = 10

    with pytest.raises(ValueError, match="sampler=ddpm"):
        ddpm(Denoiser(torch.nn.Identity(), NoBuffers()), torch.zeros(1, 1), PerSampleNoise([0]))
    with pytest.raises(ValueError, match="sampler.variance"):
        draw(ddpm, n=2, variance="fixed_medium")
    with pytest.raises(ValueError, match="model.learn_sigma"):  # a fixed-variance model has no learned variance
        draw(ddpm, n=2, variance="learned")


@pytest.mark.parametrize("steps", [501, 600, 999])
def test_ddim_with_more_than_half_the_steps_matches_ddim_1000(steps):
    """Gaussian data N(0.3, 0.5^2) with the exact eps: DDIM at 501, 600 and 999 steps gives DDIM-1000's mean and
    variance (the old grid started at t = 500 / 599: mean 0.257 / 0.276, variance 0.266 / 0.255)."""
    reference = draw(ddim, steps=1000)
    x = draw(ddim, steps=steps)
    assert x.mean().item() == pytest.approx(reference.mean().item(), abs=0.003)
    assert x.var().item() == pytest.approx(reference.var().item(), abs=0.003)
    assert reference.mean().item() == pytest.approx(MEAN, abs=0.015) and reference.std().item() == pytest.approx(STD, rel=0.02)
