"""The preconditioning seam (Karras et al. 2022 Table 1: c_in, c_noise, c_skip, c_out in one place), the one grid
function with one spacing vocabulary for every sampler, grids handed in, the callback's `denoised`, and the
declared schedule interface."""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import BatchNoise, GaussianMixture, MixtureDenoiser

from ddpm_lightning.diffusion import grids, schedules
from ddpm_lightning.diffusion.denoiser import (
    PARAMETERIZATIONS,
    Denoiser,
    Preconditioning,
)
from ddpm_lightning.diffusion.samplers import (
    PerSampleNoise,
    ald,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    euler_ancestral,
    heun,
    ode,
    pc,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTURE = GaussianMixture([0.6, 0.4], [[-1.0, 0.0], [1.0, 0.5]], [[[0.09, 0.0], [0.0, 0.06]], [[0.04, 0.0], [0.0, 0.12]]])
ALL_SCHEDULES = {
    "linear": schedules.linear,
    "ncsn": lambda: schedules.ncsn(sigma_max=3.0, sigma_min=0.01, L=10),
    "vp_sde": schedules.VPSDE,
    "subvp_sde": schedules.SubVPSDE,
    "ve_sde": lambda: schedules.VESDE(sigma_max=5.0),
}


def test_table_1_coefficients_of_each_parameterisation():
    """eps = c_skip x_t + c_out F: eps-prediction (0, 1), x0-prediction (1 / sigma, -alpha / sigma), v-prediction
    (sigma, alpha) / (alpha^2 + sigma^2), which on a variance-preserving schedule is (sigma, alpha)."""
    alpha, sigma = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.8])
    eps, x0, v = (PARAMETERIZATIONS[k] for k in ("eps", "x0", "v"))
    assert (eps.c_skip(alpha, sigma), eps.c_out(alpha, sigma)) == (0.0, 1.0)
    torch.testing.assert_close(x0.c_skip(alpha, sigma), 1 / sigma)
    torch.testing.assert_close(x0.c_out(alpha, sigma), -alpha / sigma)
    torch.testing.assert_close(v.c_skip(alpha, sigma), sigma)
    torch.testing.assert_close(v.c_out(alpha, sigma), alpha)
    ve_alpha, ve_sigma = torch.ones(1), torch.tensor([3.0])  # alpha^2 + sigma^2 = 10
    torch.testing.assert_close(v.c_skip(ve_alpha, ve_sigma), torch.tensor([0.3]))
    x, F = torch.tensor([0.3, -1.2]), torch.tensor([0.7, 0.1])
    for pre in (eps, x0, v):  # the network sees x_t and the schedule's time label by default
        assert pre.c_in(alpha, sigma) == 1.0
        # each parameterisation's eps is c_skip x_t + c_out F (grouped as before the seam, to keep its rounding)
        torch.testing.assert_close(pre.eps(x, alpha, sigma, F), Preconditioning.eps(pre, x, alpha, sigma, F))


def test_a_new_preconditioning_is_one_class(monkeypatch):
    """A preconditioning with its own c_in and c_noise (the shape EDM's will have) plugs in by name: the network
    sees c_in x_t and c_noise(t), the output is mixed by c_skip and c_out, and a sampler runs it unchanged."""
    seen = {}

    class Halved(Preconditioning):
        def c_in(self, alpha, sigma):
            return 0.5

        def c_noise(self, schedule, t):
            return -t.float()

        def c_skip(self, alpha, sigma):
            return 2.0

        def c_out(self, alpha, sigma):
            return 3.0

    class Recorder(torch.nn.Module):
        def forward(self, x, label):
            seen["x"], seen["label"] = x, label
            return torch.ones_like(x)

    monkeypatch.setitem(PARAMETERIZATIONS, "halved", Halved())
    schedule = schedules.linear(T=10)
    d = Denoiser(Recorder(), schedule, "halved")
    x, t = torch.full((2, 3), 4.0), torch.tensor([3, 7])
    torch.testing.assert_close(d.eps(x, t), 2.0 * x + 3.0)
    torch.testing.assert_close(seen["x"], 0.5 * x)
    torch.testing.assert_close(seen["label"], -t.float())
    assert ddim(d, x, PerSampleNoise([0, 1]), steps=3).shape == x.shape


def test_D_is_the_x0_prediction_at_the_scaled_input():
    """Karras et al. eq. 2: D(x^; sigma) = x_0(alpha x^, t(sigma)) for every schedule; the denoiser's view equals
    the function the samplers call."""
    for name, make in ALL_SCHEDULES.items():
        schedule = make()
        d = MixtureDenoiser(MIXTURE, schedule)
        x_hat = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        t = schedule.t_of_noise_level(torch.tensor(0.7, dtype=torch.float64)).expand(5)
        expected = d.x0(schedule.alpha(t).view(-1, 1).double() * x_hat, t)
        torch.testing.assert_close(d.D(x_hat, 0.7), expected, msg=name)


def test_one_vocabulary_every_sampler_accepts_every_name():
    """Each name of grids.SPACINGS is valid for the samplers on times and on noise levels (ddpm excepted for the
    level grids, which give fractional steps); an unknown one is refused with the whole list."""
    schedule = schedules.linear(T=100)
    for spacing in grids.SPACINGS:
        for sampler in (ddim, dpmpp_2m, heun, euler, euler_ancestral):
            sampler.check(schedule, steps=5, spacing=spacing)
        pc.check(schedule, steps=5, spacing=spacing)
        ode.check(schedule, steps=5, spacing=spacing, method="euler")
        if spacing in grids.LEVEL_SPACINGS:
            with pytest.raises(ValueError, match="ddpm respaces on step indices"):
                ddpm.check(schedule, steps=5, spacing=spacing)
        else:
            ddpm.check(schedule, steps=5, spacing=spacing)
    for sampler in (ddim, heun, pc):
        with pytest.raises(ValueError, match="sampler.spacing='cubic'.*trailing.*karras"):
            sampler.check(schedule, steps=5, spacing="cubic")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "quadratic"])
def test_the_same_name_visits_the_same_noise_levels(spacing):
    """A time spacing gives a sampler on noise levels the levels of the times DDIM visits: Euler on it is DDIM
    (eta = 0) step for step (Karras et al. §3), without handing `sigmas` in."""
    schedule = schedules.linear()
    denoiser = MixtureDenoiser(MIXTURE, schedule)
    x_T = BatchNoise(0).randn_like(torch.empty(300, 2, dtype=torch.float64))
    ref, mine = [], []
    ddim(denoiser, x_T.clone(), None, steps=8, spacing=spacing, callback=lambda k, x: ref.append(x))
    euler(denoiser, x_T.clone(), None, steps=8, spacing=spacing, callback=lambda k, x: mine.append(x))
    assert len(ref) == len(mine) == 8
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_level_spacing_gives_the_times_of_its_levels():
    """grid(levels=False) of karras / log_snr: the times whose noise levels are the level grid's."""
    for name, make in ALL_SCHEDULES.items():
        schedule = make()
        for spacing in grids.LEVEL_SPACINGS:
            ts = torch.tensor(grids.grid(schedule, 6, spacing), dtype=torch.float64)
            sigmas = torch.tensor(grids.grid(schedule, 6, spacing, levels=True), dtype=torch.float64)
            torch.testing.assert_close(schedule.noise_level(ts).double(), sigmas[:-1], rtol=1e-6, atol=0, msg=name)


def test_old_spellings_sample_as_before():
    """`uniform` is `leading` on a time grid and the even-in-time levels on a level grid (stored configs)."""
    schedule = schedules.linear()
    assert grids.grid(schedule, 10, "uniform") == grids.grid(schedule, 10, "leading") == schedule.timesteps(10, "uniform")
    assert grids.grid(schedule, 10, "uniform", levels=True) == schedules.noise_levels(schedule, 10, "uniform").tolist()
    assert grids.grid(schedule, 10, "karras", levels=True) == schedules.noise_levels(schedule, 10, "karras").tolist()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pc", "ode", "ald"])
def test_a_grid_handed_in_is_the_grid_computed(name):
    """ts = grid(schedule, steps, spacing) handed in samples exactly as steps and spacing do."""
    schedule = ALL_SCHEDULES["ncsn" if name == "ald" else "linear"]()
    if name == "ald":
        sampler, opts, ts = ald, {"levels": 4, "n_steps_each": 3}, grids.grid(schedule, 4, "trailing")
    else:
        sampler = {"ddpm": ddpm, "ddim": ddim, "pc": pc, "ode": ode}[name]
        opts = {"steps": 6, "spacing": "quadratic"} | ({"method": "heun"} if name == "ode" else {})
        ts = grids.grid(schedule, 6, "quadratic")
    denoiser = MixtureDenoiser(MIXTURE, schedule)
    x_T = BatchNoise(1).randn_like(torch.empty(50, 2, dtype=torch.float64)) * schedule.prior_std()
    a = sampler(denoiser, x_T.clone(), BatchNoise(2), **opts)
    b = sampler(denoiser, x_T.clone(), BatchNoise(2), ts=ts, **{k: v for k, v in opts.items() if k not in ("steps", "spacing", "levels")})
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler, opts", [(ddim, {"steps": 5}), (ddpm, {"steps": 5}), (dpmpp_2m, {"steps": 5}),
                                           (heun, {"steps": 4}), (euler_ancestral, {"steps": 5})])
def test_callbacks_carry_denoised(sampler, opts):
    """A callback that takes `denoised` gets each step's x_0 prediction; the last step of these samplers lands on
    it (clip_denoised off). A two-argument callback is called as before."""
    schedule = schedules.linear(T=100)
    denoiser = MixtureDenoiser(MIXTURE, schedule)
    x_T = BatchNoise(3).randn_like(torch.empty(40, 2, dtype=torch.float64))
    steps, old = [], []
    x = sampler(denoiser, x_T.clone(), BatchNoise(4), clip_denoised=False,
                callback=lambda k, x, denoised=None: steps.append((k, x, denoised)), **opts)
    assert len(steps) == opts["steps"] and all(d is not None and d.shape == x.shape for _, _, d in steps)
    torch.testing.assert_close(steps[-1][2], x)
    sampler(denoiser, x_T.clone(), BatchNoise(4), clip_denoised=False, callback=lambda k, x: old.append(x), **opts)
    assert len(old) == len(steps) and all(torch.equal(a, b) for a, (_, b, _) in zip(old, steps))


def test_schedules_declare_their_interface():
    """The declared flags replace probing: DDPM's buffers (`discrete`), an SDE (`has_sde`), continuous time."""
    flags = {name: (s.discrete, s.has_sde, s.continuous) for name, s in ((n, m()) for n, m in ALL_SCHEDULES.items())}
    assert flags == {"linear": (True, True, False), "ncsn": (False, False, False), "vp_sde": (False, True, True),
                     "subvp_sde": (False, True, True), "ve_sde": (False, True, True)}
    with pytest.raises(TypeError):
        schedules.Schedule()  # abstract: alpha, sigma, net_label, sample_t, timesteps
    with pytest.raises(NotImplementedError, match="has no SDE"):
        ALL_SCHEDULES["ncsn"]().sde(torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="sampler=ode needs a schedule with an SDE"):
        ode.check(ALL_SCHEDULES["ncsn"](), steps=5)
