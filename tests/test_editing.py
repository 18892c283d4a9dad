"""Editing (ddpm_lightning.diffusion.editing): RePaint's schedule of jumps (Lugmayr et al. 2022), inpainting of
Gaussian data with the exact eps (an empty mask is the sampler itself, known pixels are kept exactly, independent
pixels sample their prior, correlated ones move toward the exact conditional), SDEdit (Meng et al. 2022: strength
1 is sampling from scratch; data in gives data out), and bad input refused before any compute."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers.oracles import BatchNoise, FullGaussianDenoiser
from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.editing import Inpaint, SDEdit, repaint, repaint_levels, sampler_options
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ald, ddim, ddpm, dpmpp_2m, euler_ancestral, heun, pc

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 2, 2)
KEEP = torch.tensor([True, True, False, False])  # the first row of the 2 x 2 image is known


def linear(T: int):
    return schedules.linear(T=T, beta_start=0.1 / T, beta_end=20.0 / T)


def blocks(rho: float) -> torch.Tensor:
    """Pixels (0, 2) and (1, 3) correlated by rho, variance 0.25."""
    return 0.25 * torch.tensor([[1, 0, rho, 0], [0, 1, 0, rho], [rho, 0, 1, 0], [0, rho, 0, 1]], dtype=torch.float64)


def inpaint_stats(denoiser, sampler, known, mask, jump_length, jump_n_sample, n=2000):
    noise = BatchNoise(0)
    x = noise.randn_like(torch.zeros(n, *SHAPE))
    func, options = sampler_options(sampler)
    out = repaint(denoiser, x, noise, known.expand(n, *SHAPE), mask, func, options, jump_length, jump_n_sample)
    return out.double().flatten(1)


def test_repaint_schedule_goes_down_with_jumps_back_up():
    assert repaint_levels(4, 2, 2) == [4, 3, 2, 1, 0, 1, 2, 1, 0]
    assert repaint_levels(5) == [5, 4, 3, 2, 1, 0]
    for steps, j, r in [(20, 3, 4), (100, 10, 10), (7, 7, 3)]:
        path = repaint_levels(steps, j, r)
        assert path[0] == steps and path[-1] == 0
        assert all(abs(a - b) == 1 for a, b in zip(path, path[1:]))
        downs = sum(b < a for a, b in zip(path, path[1:]))
        assert downs == steps + (r - 1) * j * len(range(0, steps - j, j))
    with pytest.raises(ValueError, match="jump_length"):
        repaint_levels(10, 0, 2)


@pytest.mark.parametrize("sampler", [functools.partial(ddpm, steps=10), functools.partial(ddim, steps=5, eta=0.5)])
def test_an_empty_mask_is_the_sampler_and_a_full_one_the_input(sampler):
    schedule = linear(40)
    denoiser = FullGaussianDenoiser(torch.zeros(4), blocks(0.5), schedule)
    images = torch.rand(3, *SHAPE) * 2 - 1
    seeds = [3, 4, 5]
    noise = PerSampleNoise(seeds)
    plain = sampler(denoiser, noise.randn(SHAPE), noise)
    out = Inpaint(images, torch.zeros(1, *SHAPE))(sampler, denoiser, PerSampleNoise(seeds), SHAPE)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    kept = Inpaint(images, torch.ones(3, *SHAPE), jump_length=2, jump_n_sample=3)(sampler, denoiser, PerSampleNoise(seeds), SHAPE)
    torch.testing.assert_close(kept, images, rtol=0, atol=0)


def test_independent_unknown_pixels_sample_their_prior_with_resampling():
    """With independent pixels the known ones carry no information: the unknown pixels are distributed as the
    sampler's own samples (the jumps back up are the forward process), the known ones are the input."""
    schedule = linear(50)
    cov = torch.diag(torch.tensor([0.2, 0.3, 0.25, 0.15], dtype=torch.float64))
    denoiser = FullGaussianDenoiser(torch.tensor([0.1, -0.1, 0.2, -0.3]), cov, schedule)
    sampler = functools.partial(ddpm, variance="fixed_large", clip_denoised=False)
    known = torch.tensor([0.5, -0.5, 0.0, 0.0]).reshape(1, *SHAPE)
    plain = inpaint_stats(denoiser, sampler, known, torch.zeros(1, *SHAPE), 1, 1)[:, 2:]
    out = inpaint_stats(denoiser, sampler, known, KEEP.float().reshape(1, *SHAPE), 5, 4)
    assert (out[:, :2] == known.flatten()[:2].double()).all()
    n = len(out)
    se = (cov.diag()[2:] * 2 / n).sqrt()
    assert ((out[:, 2:].mean(0) - plain.mean(0)).abs() < 4 * se).all()
    assert ((out[:, 2:].var(0) - plain.var(0)).abs() < 4 * cov.diag()[2:] * (2 * 2 / n) ** 0.5).all()


def test_resampling_moves_correlated_pixels_toward_the_exact_conditional():
    """Strongly correlated pixels, the known ones far from the mean: replacement (no resampling) stays far from
    the exact conditional mean E[x_u | x_k]; RePaint's jumps (5 x 20) remove most of that error and give the
    conditional variance. RePaint is not exact with finitely many steps: the unconditional eps ignores that the
    known pixels are known, which the resampling only partly repairs."""
    schedule = linear(50)
    denoiser = FullGaussianDenoiser(torch.zeros(4), blocks(0.9), schedule)
    sampler = functools.partial(ddpm, variance="fixed_small", clip_denoised=False)
    known = torch.tensor([0.8, -0.8, 0.0, 0.0]).reshape(1, *SHAPE)
    mask = KEEP.float().reshape(1, *SHAPE)
    mean, cov = denoiser.conditional(known, KEEP)
    replacement = inpaint_stats(denoiser, sampler, known, mask, 1, 1)[:, 2:]
    resampled = inpaint_stats(denoiser, sampler, known, mask, 5, 20)[:, 2:]
    err_replacement = (replacement.mean(0) - mean).abs()
    err_resampled = (resampled.mean(0) - mean).abs()
    assert (err_resampled < 0.5 * err_replacement).all(), (err_resampled, err_replacement)
    torch.testing.assert_close(resampled.var(0), cov.diag(), rtol=0.2, atol=0)


SDEDIT_CASES = {
    "ddpm": (lambda: linear(100), functools.partial(ddpm, clip_denoised=False)),
    "ddim": (lambda: linear(100), functools.partial(ddim, steps=50)),
    "dpmpp_2m": (lambda: linear(100), functools.partial(dpmpp_2m, steps=15)),
    "heun_vp": (lambda: schedules.VPSDE(), functools.partial(heun, steps=20)),
    "euler_ancestral_ve": (lambda: schedules.VESDE(sigma_max=5.0), functools.partial(euler_ancestral, steps=40)),
    "pc_ve": (lambda: schedules.VESDE(sigma_max=5.0), functools.partial(pc, steps=100, snr=0.1)),
}


@pytest.mark.parametrize("case", list(SDEDIT_CASES))
def test_sdedit_at_strength_one_is_sampling_from_scratch(case):
    make_schedule, sampler = SDEDIT_CASES[case]
    schedule = make_schedule()
    denoiser = FullGaussianDenoiser(torch.zeros(4), blocks(0.5), schedule)
    seeds = [7, 8]
    noise = PerSampleNoise(seeds)
    scratch = sampler(denoiser, noise.randn(SHAPE) * schedule.prior_std(), noise)
    out = SDEdit(torch.rand(2, *SHAPE) - 0.5, 1.0)(sampler, denoiser, PerSampleNoise(seeds), SHAPE)
    torch.testing.assert_close(out, scratch, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(SDEDIT_CASES))
def test_sdedit_of_data_gives_data(case):
    """Inputs drawn from the data N(m, S): noised to t0 and denoised with the exact eps, the outputs are again
    N(m, S) (within the sampler's discretisation and the sampling error), at every strength; and at a small
    strength they stay close to their inputs."""
    make_schedule, sampler = SDEDIT_CASES[case]
    schedule = make_schedule()
    m, S = torch.tensor([0.1, -0.2, 0.0, 0.2]), blocks(0.6)
    denoiser = FullGaussianDenoiser(m, S, schedule)
    n = 1500
    g = torch.Generator().manual_seed(0)
    x = (m.double() + torch.randn(n, 4, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(S).T).float()
    images = x.reshape(n, *SHAPE)
    distance = {}
    for strength in (0.2, 0.6):
        out = SDEdit(images, strength)(sampler, denoiser, BatchNoise(1), SHAPE).double().flatten(1)
        assert ((out.mean(0) - m.double()).abs() < 0.06).all(), out.mean(0)
        torch.testing.assert_close(torch.cov(out.T), S, rtol=0, atol=0.05)
        distance[strength] = (out - x.double()).pow(2).sum(1).mean()
    assert distance[0.2] < distance[0.6]


def test_bad_edits_are_refused_before_any_compute():
    schedule = linear(40)
    sampler = functools.partial(ddpm)
    images = torch.zeros(2, *SHAPE)
    mask = torch.ones(1, *SHAPE)
    Inpaint(images, mask, 2, 2).check(sampler, schedule, SHAPE, 2)
    bad = [
        (Inpaint(torch.zeros(2, 3, 2, 2), mask), sampler, "model makes"),
        (Inpaint(torch.zeros(2, 1, 4, 4), mask), sampler, "model makes"),
        (Inpaint(images, mask), sampler, "seed"),  # three seeds below
        (Inpaint(images + 2, mask), sampler, r"\[-1, 1\]"),
        (Inpaint(images, mask * 0.5), sampler, "binary"),
        (Inpaint(images, torch.ones(1, 1, 3, 3)), sampler, "height and width"),
        (Inpaint(images, mask, 0, 2), sampler, "jump_length"),
        (Inpaint(images, mask), functools.partial(dpmpp_2m), "ddpm or sampler=ddim"),
        (SDEdit(images, 0.0), sampler, "strength"),
        (SDEdit(images, 1.5), sampler, "strength"),
        (SDEdit(images, 0.5), functools.partial(ald), "ald"),
    ]
    for edit, s, match in bad:
        with pytest.raises(ValueError, match=match):
            edit.check(s, schedule, SHAPE, 3 if match == "seed" else 2)
    with pytest.raises(ValueError, match="schedule"):  # ddpm needs a discrete schedule
        Inpaint(images, mask).check(sampler, schedules.VPSDE(), SHAPE, 2)


# --- predictor-corrector imputation (Song et al. 2021 App. I.2) ------------------------------------------------

PC_CASES = {
    "ve_reverse_diffusion": (lambda: schedules.VESDE(sigma_max=5.0), functools.partial(pc, steps=30, snr=0.1)),
    "vp_ancestral": (lambda: schedules.VPSDE(), functools.partial(pc, steps=30, predictor="ancestral", n_corrector=2)),
    "linear_euler_maruyama": (lambda: linear(40), functools.partial(pc, steps=20, predictor="euler_maruyama", denoise=False)),
}


@pytest.mark.parametrize("case", list(PC_CASES))
def test_pc_inpainting_with_an_empty_mask_is_pc_and_with_a_full_one_the_input(case):
    make_schedule, sampler = PC_CASES[case]
    schedule = make_schedule()
    denoiser = FullGaussianDenoiser(torch.zeros(4), blocks(0.5), schedule)
    images = torch.rand(3, *SHAPE) * 2 - 1
    seeds = [3, 4, 5]
    noise = PerSampleNoise(seeds)
    plain = sampler(denoiser, noise.randn(SHAPE) * schedule.prior_std(), noise)
    edit = Inpaint(images, torch.zeros(1, *SHAPE))
    edit.check(sampler, schedule, SHAPE, 3)
    torch.testing.assert_close(edit(sampler, denoiser, PerSampleNoise(seeds), SHAPE), plain, rtol=0, atol=0)
    kept = Inpaint(images, torch.ones(3, *SHAPE))(sampler, denoiser, PerSampleNoise(seeds), SHAPE)
    torch.testing.assert_close(kept, images, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["ve_reverse_diffusion", "vp_ancestral"])
def test_pc_inpainting_of_independent_pixels_samples_the_unknown_ones_as_pc_does(case):
    """Independent pixels: the known ones carry no information, so the unknown pixels are distributed as pc's own
    samples (the replacement after every step does not touch them), and the known ones are the input."""
    make_schedule, sampler = PC_CASES[case]
    schedule = make_schedule()
    cov = torch.diag(torch.tensor([0.2, 0.3, 0.25, 0.15], dtype=torch.float64))
    denoiser = FullGaussianDenoiser(torch.tensor([0.1, -0.1, 0.2, -0.3]), cov, schedule)
    known = torch.tensor([0.5, -0.5, 0.0, 0.0]).reshape(1, *SHAPE)
    n = 2000
    x = BatchNoise(0).randn_like(torch.zeros(n, *SHAPE)) * schedule.prior_std()
    plain = sampler(denoiser, x, BatchNoise(1)).double().flatten(1)[:, 2:]
    edit = Inpaint(known.expand(n, *SHAPE), KEEP.float().reshape(1, *SHAPE))
    out = edit(sampler, denoiser, BatchNoise(2), SHAPE).double().flatten(1)
    assert (out[:, :2] == known.flatten()[:2].double()).all()
    se = (cov.diag()[2:] * 2 / n).sqrt()
    assert ((out[:, 2:].mean(0) - plain.mean(0)).abs() < 4 * se).all(), (out[:, 2:].mean(0), plain.mean(0))
    assert ((out[:, 2:].var(0) - plain.var(0)).abs() < 4 * cov.diag()[2:] * (2 * 2 / n) ** 0.5).all()
    assert ((out[:, 2:].mean(0) - denoiser.m[2:]).abs() < 0.1).all()


def test_pc_inpainting_refuses_repaints_jumps_and_other_samplers_stay_refused():
    schedule = schedules.VESDE(sigma_max=5.0)
    images, mask = torch.zeros(2, *SHAPE), torch.ones(1, *SHAPE)
    Inpaint(images, mask, 10, 1).check(functools.partial(pc, steps=10), schedule, SHAPE, 2)
    with pytest.raises(ValueError, match="edit.jump_n_sample=1"):
        Inpaint(images, mask, 10, 10).check(functools.partial(pc, steps=10), schedule, SHAPE, 2)
    with pytest.raises(ValueError, match="sampler.predictor"):
        Inpaint(images, mask).check(functools.partial(pc, predictor="leapfrog"), schedule, SHAPE, 2)
    for other in (ald, heun, euler_ancestral):
        with pytest.raises(ValueError, match="sampler=ddpm or sampler=ddim .*sampler=pc"):
            Inpaint(images, mask).check(functools.partial(other), schedule, SHAPE, 2)
