"""The objectives of today's training: EDM (Karras et al. 2022), min-SNR and soft-min-SNR weighting (Hang et al. 2023;
Crowson et al. 2024) and flow matching (Lipman et al. 2023), each against its paper's formula, against exact
Gaussian oracles for the samplers and the likelihood, and through training, resume, loading and export."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import compose_cfg
from helpers.resume import states
from torch import nn

from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.denoiser import PARAMETERIZATIONS, Denoiser
from ddpm_lightning.diffusion.grids import time_range
from ddpm_lightning.diffusion.likelihood import ode_logp
from ddpm_lightning.diffusion.losses import diffusion_losses
from ddpm_lightning.diffusion.samplers import PerSampleNoise, dpmpp_2m, euler, heun, ode
from ddpm_lightning.diffusion.schedules import expand_as
from ddpm_lightning.diffusion.weighting import F_weight, snr
from ddpm_lightning.interop.diffusers import UnsupportedConfig, diffusers_scheduler_config
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import train

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA_D = 0.5


class Recorder(nn.Module):
    """A fixed nonlinear 'network' that remembers what it was given."""

    def forward(self, x, label, **cond):
        self.x_in, self.label = x, label
        return torch.tanh(x) + 0.1 * expand_as(label, x)


def test_edm_denoiser_is_table_1():
    """D(x^; sigma) = c_skip x^ + c_out F(c_in x^; ln(sigma)/4) with Karras et al.'s Table 1 coefficients (sigma_d =
    0.5), on the EDM schedule (alpha = 1) and on a VP schedule (x^ = x_t / alpha)."""
    net = Recorder()
    x_hat = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for schedule in (schedules.EDMSchedule(), schedules.VPSDE()):
        den = Denoiser(net, schedule, "edm")
        for sigma in (0.05, 0.5, 7.0):
            D = den.D(x_hat, sigma)
            root = math.sqrt(sigma**2 + SIGMA_D**2)
            torch.testing.assert_close(net.x_in, x_hat / root, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(net.label, torch.full((3,), math.log(sigma) / 4), rtol=1e-4, atol=1e-5)
            F = torch.tanh(net.x_in) + 0.1 * expand_as(net.label, x_hat)
            expected = SIGMA_D**2 / (sigma**2 + SIGMA_D**2) * x_hat + sigma * SIGMA_D / root * F
            torch.testing.assert_close(D, expected, rtol=1e-4, atol=1e-4)


def test_edm_loss_is_lambda_times_the_denoising_error():
    """Karras et al. eq. 8 with Table 1's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2: the training loss
    per example is lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2 (mean over dimensions)."""
    schedule = schedules.EDMSchedule()
    den = Denoiser(Recorder(), schedule, "edm")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.randn(6, 1, 4, 4, generator=g)
    t = schedule.sample_t(6, torch.device("cpu"), g)
    loss = diffusion_losses(den, x0, t, eps)["loss"]
    for i in range(6):
        sigma = schedule.sigma(t[i : i + 1]).item()
        D = den.D(x0[i : i + 1] + sigma * eps[i : i + 1], sigma)
        lam = (sigma**2 + SIGMA_D**2) / (sigma * SIGMA_D) ** 2
        torch.testing.assert_close(loss[i], lam * (D - x0[i : i + 1]).pow(2).mean(), rtol=2e-4, atol=1e-6)


def test_edm_training_noise_is_the_papers_log_normal():
    """ln sigma of the training draws ~ N(-1.2, 1.2^2) (Table 1, P_mean and P_std)."""
    schedule = schedules.EDMSchedule()
    log_sigma = schedule.sigma(schedule.sample_t(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))).double().log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.01 and abs(log_sigma.std().item() - 1.2) < 0.01


def test_flow_matching_loss_is_the_velocity_error_and_the_path_is_straight():
    """x_t = (1 - t) x_0 + t eps; the loss is ||F - (eps - x_0)||^2 (Lipman et al. 2023 eq. 23), whatever t."""
    schedule = schedules.RectifiedFlow()
    net = Recorder()
    den = Denoiser(net, schedule, "flow")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1 - 2**-24])
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), (1 - t[:, None]) * x0 + t[:, None] * eps)
    loss = diffusion_losses(den, x0, t, eps)["loss"]
    F = torch.tanh(net.x_in) + 0.1 * net.label[:, None]
    torch.testing.assert_close(loss, (F - (eps - x0)).pow(2).mean(1))
    assert torch.isfinite(loss).all()
    u = torch.tanh(net.x_in) + 0.1 * net.label[:, None]
    x_t = schedule.q_sample(x0, t, eps)  # the eps and x_0 read off a velocity: x_0 = eps - u
    torch.testing.assert_close(den.x0(x_t[1:4], t[1:4]), den.eps(x_t[1:4], t[1:4]) - u[1:4], rtol=1e-4, atol=1e-5)


VP = {"linear": schedules.linear, "cosine": schedules.cosine, "vp_sde": schedules.VPSDE}
OTHER = {"ve_sde": lambda: schedules.VESDE(sigma_max=50.0), "subvp_sde": schedules.SubVPSDE, "edm": schedules.EDMSchedule,
         "rectified_flow": schedules.RectifiedFlow}


def _times(schedule) -> torch.Tensor:
    if schedule.discrete:
        return torch.arange(schedule.T)
    return torch.linspace(schedule.t_min, getattr(schedule, "t_max", 1.0), 101, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(VP))
@pytest.mark.parametrize("weighting", ["min_snr", "soft_min_snr"])
def test_each_weight_is_the_papers_for_each_parameterisation(name, weighting):
    """Hang et al. 2023's min-SNR-gamma (gamma = 5) on a variance-preserving schedule: min(SNR, gamma) / SNR on the eps
    error, min(SNR, gamma) on the x_0 error, min(SNR, gamma) / (SNR + 1) on the v error; soft-min-SNR (Crowson et
    al. 2024) the same with min(SNR, gamma) replaced by (1/SNR + 1/gamma)^-1."""
    schedule = VP[name]()
    t = _times(schedule)
    alpha, sigma = schedule.alpha(t).double(), schedule.sigma(t).double()
    s = snr(alpha, sigma)
    m = s.clamp(max=5.0) if weighting == "min_snr" else 1 / (1 / s + 1 / 5.0)
    paper = {"eps": m / s, "x0": m, "v": m / (s + 1)}
    for parameterization, expected in paper.items():
        w = F_weight(weighting, 5.0, PARAMETERIZATIONS[parameterization], alpha, sigma)
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(OTHER))
@pytest.mark.parametrize("parameterization", sorted(PARAMETERIZATIONS))
def test_on_any_schedule_the_weighted_loss_is_the_weight_on_the_x0_error(name, parameterization):
    """On every schedule and for every network output the weighted loss equals w(SNR) ||x_0 - x^_0||^2."""
    schedule = OTHER[name]()
    den = Denoiser(Recorder(), schedule, parameterization)
    g = torch.Generator().manual_seed(3)
    t = _times(schedule)[1:-1:10].float()
    x0, eps = torch.randn(len(t), 4, generator=g), torch.randn(len(t), 4, generator=g)
    loss = diffusion_losses(den, x0, t, eps, weighting="min_snr", snr_gamma=5.0)["loss"]
    x_t = schedule.q_sample(x0, t, eps)
    x0_error = (den.x0(x_t, t) - x0).double().pow(2).mean(1)
    expected = snr(schedule.alpha(t).double(), schedule.sigma(t).double()).clamp(max=5.0) * x0_error
    torch.testing.assert_close(loss.double(), expected, rtol=2e-3, atol=1e-6)


def test_the_weights_at_the_ends():
    """SNR -> 0 (pure noise): min-SNR and soft-min-SNR weigh the eps error by 1 and the x_0 error by SNR -> 0; SNR ->
    infinity (clean data): the eps error by gamma / SNR -> 0 and the x_0 error by gamma. All finite."""
    alpha = torch.tensor([1e-6, 1.0, 1.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 1e-6, 0.0], dtype=torch.float64)
    for weighting in ("min_snr", "soft_min_snr"):
        eps_w = F_weight(weighting, 5.0, PARAMETERIZATIONS["eps"], alpha, sigma)
        x0_w = F_weight(weighting, 5.0, PARAMETERIZATIONS["x0"], alpha, sigma)
        torch.testing.assert_close(eps_w, torch.tensor([1.0, 5e-12, 0.0], dtype=torch.float64), rtol=1e-5, atol=1e-15)
        torch.testing.assert_close(x0_w, torch.tensor([1e-12, 5.0, 5.0], dtype=torch.float64), rtol=1e-5, atol=1e-15)
        flow_w = F_weight(weighting, 5.0, PARAMETERIZATIONS["flow"], 1 - torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
        assert torch.isfinite(flow_w).all()  # t = 1 (alpha = 0) and t = 0 (sigma = 0) of the straight path


class ExactF(Denoiser):
    """The exact network output for data N(m, s^2 I): the target of the posterior means E[x_0 | x_t], E[eps | x_t]
    (every target is linear in x_0 and eps), under any preconditioning."""

    def __init__(self, schedule, parameterization, m, s):
        super().__init__(nn.Identity(), schedule, parameterization)
        self.m, self.s = m, s

    def F_and_v(self, x, t, alpha, sigma, **cond):
        dtype, a, sg, x = x.dtype, alpha.double(), sigma.double(), x.double()
        var = a**2 * self.s**2 + sg**2
        eps = sg * (x - a * self.m) / var
        x0 = self.m + a * self.s**2 * (x - a * self.m) / var
        return self.precond.target(x0, eps, a, sg).to(dtype), None


M, S = 0.5, 0.3
SAMPLERS = {
    "ode_euler": lambda d, x, n: ode(d, x, n, method="euler", steps=1000),
    "ode_midpoint": lambda d, x, n: ode(d, x, n, method="midpoint", steps=100),
    "ode_heun": lambda d, x, n: ode(d, x, n, method="heun", steps=100),
    "ode_rk45": lambda d, x, n: ode(d, x, n),
    "heun": lambda d, x, n: heun(d, x, n, steps=50),
    "euler": lambda d, x, n: euler(d, x, n, steps=200, spacing="log_snr"),
    "dpmpp_2m": lambda d, x, n: dpmpp_2m(d, x, n, steps=50),
}


@pytest.mark.parametrize("objective", ["edm", "flow"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_with_the_exact_network_every_sampler_draws_the_data(objective, sampler):
    """With the exact F of Gaussian data N(0.5, 0.3^2) each sampler's 4000 samples have the data's mean and standard
    deviation (within 4 standard errors and the solver's error at these step counts: 2%)."""
    schedule = schedules.EDMSchedule() if objective == "edm" else schedules.RectifiedFlow()
    den = ExactF(schedule, objective, M, S)
    noise = PerSampleNoise(range(4000))
    x = SAMPLERS[sampler](den, noise.randn((2,)) * schedule.prior_std(), noise)
    assert abs(x.mean().item() - M) < 4 * S / math.sqrt(8000) + 0.005
    assert abs(x.std().item() / S - 1) < 0.02 + 4 / math.sqrt(2 * 8000)


def test_a_wrong_velocity_is_caught():
    """The control of the test above: a velocity 10% too large draws another distribution."""

    class Wrong(ExactF):
        def F_and_v(self, x, t, alpha, sigma, **cond):
            return 1.1 * super().F_and_v(x, t, alpha, sigma)[0], None

    schedule = schedules.RectifiedFlow()
    noise = PerSampleNoise(range(2000))
    x = ode(Wrong(schedule, "flow", M, S), noise.randn((2,)), noise)
    assert abs(x.std().item() / S - 1) > 0.05 or abs(x.mean().item() - M) > 0.05


@pytest.mark.parametrize("objective", ["edm", "flow"])
def test_the_ode_likelihood_of_gaussian_data_is_its_closed_form(objective):
    """For data N(m, s^2 I) the probability-flow ODE maps x at t_min to z = alpha_T m + sqrt(v_T / v_min) (x - alpha_min m)
    at T (v_t = alpha_t^2 s^2 + sigma_t^2), so the ODE log-density with the exact network is log N(z; 0, prior_std^2 I)
    + d/2 log(v_T / v_min) exactly: the prior in place of p_T is the only approximation (Song et al. App. D)."""
    schedule = schedules.EDMSchedule() if objective == "edm" else schedules.RectifiedFlow(t_min=1e-4)
    den = ExactF(schedule, objective, M, S)
    x = M + S * torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logp, nfe = ode_logp(den, x, PerSampleNoise(range(16)), trace="exact", rtol=1e-6, atol=1e-6)
    ends = torch.tensor(list(time_range(schedule)), dtype=torch.float64)  # (T, t_min)
    (a_T, a_min), (s_T, s_min) = schedule.alpha(ends).tolist(), schedule.sigma(ends).tolist()
    v_T, v_min = a_T**2 * S**2 + s_T**2, a_min**2 * S**2 + s_min**2
    z = a_T * M + math.sqrt(v_T / v_min) * (x - a_min * M)
    exact = schedule.prior_logp(z) + 1.5 * math.log(v_T / v_min)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-3)
    assert nfe > 10


def test_rectified_flow_times_and_levels():
    """t_of_noise_level inverts t / (1 - t); sampling starts at t = 0.999 from N(0, I); logit-normal draws lie in (0, 1)
    with median 1/2."""
    schedule = schedules.RectifiedFlow(t_sampling="logit_normal")
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_of_noise_level(schedule.noise_level(t)), t)
    assert schedule.timesteps(10)[0] == pytest.approx(0.999) and schedule.prior_std() == 1.0
    draws = schedule.sample_t(100_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0 < draws.min() and draws.max() < 1 and abs(draws.median().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="t_sampling"):
        schedules.RectifiedFlow(t_sampling="beta")


OBJECTIVES = {
    "edm": ["experiment=edm_digits"],
    "flow": ["experiment=flow_digits", "schedule.t_sampling=logit_normal"],
    "v_min_snr": ["module.parameterization=v", "module.weighting=min_snr"],
    "eps_soft_min_snr": ["module.weighting=soft_min_snr", "module.snr_gamma=4.0"],
}
RUN = ["trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.samples.every_n_steps=0",
       "trainer.val_check_interval=4", "logger=none", "sampler.steps=3"]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_trains_resumes_bitwise_and_loads_from_its_checkpoint(objective, tmp_path):
    """4 steps straight equal 2 steps then a resume to 4, bitwise (weights, EMA, Adam); the checkpoint records the
    objective and load_model samples with it."""
    run = [*OBJECTIVES[objective], *RUN]
    train(compose_cfg(run, tmp_path / "straight"))
    train(compose_cfg([*run, "trainer.max_steps=2"], tmp_path / "resumed"))
    train(compose_cfg(run, tmp_path / "resumed"))
    a, b = (states(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("raw", "ema"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), f"{part} {k} differs after resume"
    model = load_model(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    cfg = compose_cfg(run)
    assert model.hparams.parameterization == cfg.module.parameterization
    assert model.hparams.weighting == cfg.module.weighting and model.hparams.schedule["_target_"] == cfg.schedule._target_
    x = model.sample(range(2))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_bad_objective_settings_are_refused_before_training(tmp_path):
    for overrides, match in [
        (["module.weighting=max_snr"], "module.weighting"),
        (["module.weighting=min_snr", "module.snr_gamma=0"], "snr_gamma"),
        (["module.parameterization=edmm"], "module.parameterization"),
        (["experiment=edm_digits", "sampler=ddpm"], "discrete"),
        (["model.learn_sigma=true", "module.loss=hybrid", "module.weighting=min_snr"], "module.weighting"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(compose_cfg([*overrides, *RUN], tmp_path / "bad"))
        assert not (tmp_path / "bad" / "checkpoints").exists()


def test_diffusers_export_refuses_edm_and_flow_with_the_reason():
    for schedule, parameterization in [({"_target_": "ddpm_lightning.diffusion.schedules.EDMSchedule"}, "edm"),
                                       ({"_target_": "ddpm_lightning.diffusion.schedules.RectifiedFlow"}, "flow"),
                                       ({"_target_": "ddpm_lightning.diffusion.schedules.linear"}, "flow")]:
        with pytest.raises(UnsupportedConfig, match="parameterization"):
            diffusers_scheduler_config(schedule, parameterization, None)


def test_classifier_free_guidance_and_controlnet_work_unchanged_on_a_flow_model(tmp_path):
    """A class-conditional flow-matching model trains with label dropout and samples with classifier-free guidance
    (w = 0 is the conditional model, w = 3 another sample); a ControlNet trains on a flow-matching base and keeps
    its objective."""
    flow = ["schedule=rectified_flow", "module.parameterization=flow"]
    train(compose_cfg(["experiment=cfg_digits", *flow, *RUN], tmp_path / "cfg"))
    model = load_model(tmp_path / "cfg" / "checkpoints" / "last.ckpt")
    assert model.net.num_classes == 10 and model.hparams.parameterization == "flow"
    cfg = {"_target_": "ddpm_lightning.diffusion.guidance.ClassifierFree", "_partial_": True, "w": 0.0}
    plain, w0 = model.sample(range(3), labels=[1, 2, 3]), model.sample(range(3), labels=[1, 2, 3], guidance=cfg)
    w3 = model.sample(range(3), labels=[1, 2, 3], guidance={**cfg, "w": 3.0})
    torch.testing.assert_close(w0, plain)
    assert torch.isfinite(w3).all() and not torch.allclose(w3, plain)

    train(compose_cfg([*flow, *RUN], tmp_path / "base"))
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    train(compose_cfg(["experiment=controlnet_digits", f"base_ckpt={base}", *RUN], tmp_path / "cn"))
    controlled = load_model(tmp_path / "cn" / "checkpoints" / "last.ckpt")
    assert controlled.hparams.parameterization == "flow" and type(controlled.schedule).__name__ == "RectifiedFlow"


def test_edm_cifar10_has_the_papers_settings():
    """Karras et al. 2022 Table 1 / App. F for CIFAR-10: batch 512, lr 1e-3, dropout 0.13, EMA half-life 0.5 Mimg,
    ramp-up 10 Mimg, 200 Mimg, Heun with 18 steps (35 network evaluations), sigma in [0.002, 80]."""
    cfg = compose_cfg(["experiment=edm_cifar10"], tiny=False)
    assert (cfg.data.batch_size, cfg.module.optimizer.lr, cfg.model.dropout) == (512, 1e-3, 0.13)
    assert cfg.module.parameterization == "edm" and cfg.schedule.sigma_min == 0.002 and cfg.schedule.sigma_max == 80.0
    assert abs(cfg.callbacks.ema.decay - 0.5 ** (512 / 500_000)) < 1e-5  # half-life 0.5 Mimg in steps of 512
    assert cfg.module.warmup_steps == round(10e6 / 512) and cfg.trainer.max_steps == round(200e6 / 512)
    assert cfg.sampler._target_.endswith(".heun") and 2 * cfg.sampler.steps - 1 == 35


@pytest.mark.parametrize("objective", [["schedule=edm", "module.parameterization=edm"],
                                       ["schedule=rectified_flow", "module.parameterization=flow"]], ids=["edm", "flow"])
def test_the_new_objectives_train_the_mlp_on_points(objective, tmp_path):
    """Every network: the toy MLP on 2-D points trains under EDM and flow matching and samples finite points."""
    train(compose_cfg(["experiment=toy2d", *objective, "sampler=heun", "sampler.steps=5", "trainer.max_steps=20",
                       "logger=none", "callbacks.samples.every_n_steps=0"], tmp_path, tiny=False))
    x = load_model(tmp_path / "checkpoints" / "last.ckpt").sample(range(50))
    assert x.shape == (50, 2) and torch.isfinite(x).all() and x.std() > 0.05
