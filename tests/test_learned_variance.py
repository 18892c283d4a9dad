"""Learned reverse variances, L_vlb and the hybrid loss (Nichol & Dhariwal 2021): the bound of Gaussian data with its
exact eps against closed forms, the learned-variance sampler against the fixed ones, the hybrid loss's stop-gradient,
the loss-aware timestep sampler, exact resume, checkpoint round trips and the errors."""

import math

import pytest
import torch
from torch import Tensor, nn

from helpers.config import compose_cfg
from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.guidance import ClassifierFree
from ddpm_lightning.diffusion.likelihood import vlb_terms
from ddpm_lightning.diffusion.losses import LossAwareTimesteps, diffusion_losses, vlb_eps_weights
from ddpm_lightning.diffusion.samplers import PerSampleNoise, check_compatible, ddpm
from ddpm_lightning.compose import build
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import train
from helpers.oracles import GaussianEps

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = 0.3, 0.5


class WithV(nn.Module):
    """A learned-variance network: the exact eps of `inner` and a constant interpolation v (output 2 v - 1)."""

    def __init__(self, inner: nn.Module, v: float):
        super().__init__()
        self.inner, self.v = inner, v

    def forward(self, x, label, **cond):
        eps = self.inner(x, label, **cond)
        return torch.cat([eps, torch.full_like(eps, 2 * self.v - 1)], 1)


def learned(schedule, v: float) -> Denoiser:
    return Denoiser(WithV(GaussianEps(schedule, MEAN, STD), v), schedule, learn_sigma=True)


def closed_form_bound(schedule, v: float, D: int) -> float:
    """E[L_1 + ... + L_{T-1}] in nats (Ho et al. eq. 5 without L_0 and L_T) for data N(MEAN, STD^2 I_D) and the
    exact eps: per dimension KL(N(mu~, beta~_t) || N(mu_theta, Sigma_t)) = 1/2 (log Sigma/beta~ + beta~/Sigma - 1
    + coef1^2 Var(x_0 | x_t) / Sigma), Var(x_0 | x_t) = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t), and
    Sigma_t = exp(v log beta_t + (1 - v) log beta~_t) (Nichol & Dhariwal eq. 15), from the betas alone."""
    betas = schedules.linear_betas(schedule.T)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    var_x0 = STD**2 * (1 - abar) / (abar * STD**2 + 1 - abar)
    sigma2 = torch.exp(v * betas.log() + (1 - v) * beta_tilde.log())
    kl = 0.5 * ((sigma2 / beta_tilde).log() + beta_tilde / sigma2 - 1 + coef1**2 * var_x0 / sigma2)
    return D * kl[1:].sum().item()


def test_vlb_loss_and_bound_of_gaussian_data_with_the_exact_eps_are_the_closed_form():
    """The training loss's L_vlb (summed over every t, as its uniform-t estimate T L_t averages to) and the
    evaluation's L_1:T-1 with learned variances v = 0.1 both equal the closed-form bound of Gaussian data."""
    B, D, v = 256, 16, 0.1
    sch = schedules.linear()
    T = sch.T
    denoiser = learned(sch, v)
    expected = closed_form_bound(sch, v, D)

    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(B, D, generator=g)
    t = torch.arange(1, T).repeat_interleave(B)  # every t > 1 for every example: [(T - 1) B]
    x0_all = x0.repeat(T - 1, 1)
    terms = diffusion_losses(denoiser, x0_all, t, torch.randn(x0_all.shape, generator=g), loss="vlb")
    nats = terms["vlb"] / T * D * math.log(2)  # T L_t in bits/dim back to L_t in nats
    per_example = nats.reshape(T - 1, B).sum(0)
    se = per_example.std().item() / B**0.5
    print(f"L_1:T-1 {per_example.mean().item():.3f} +- {se:.3f} nats, closed form {expected:.3f}")
    assert per_example.mean().item() == pytest.approx(expected, abs=4 * se + 1e-3)
    assert abs(closed_form_bound(sch, 1 - v, D) - expected) > 3 * (4 * se + 1e-3)  # a swapped v would fail
    assert torch.equal(terms["loss"], terms["vlb"])

    bound = vlb_terms(denoiser, x0[:64], PerSampleNoise(range(64)), "learned", clip_denoised=False)["L_1:T-1"]
    assert bound.mean().item() == pytest.approx(expected, abs=4 * bound.std().item() / 64**0.5 + 1e-3)


def test_learned_variance_at_v_one_or_zero_is_the_fixed_bound():
    """v = 1 gives beta_t (fixed_large) and v = 0 beta~_t (fixed_small) for every KL term of the bound."""
    sch = schedules.linear(T=50)
    x0 = MEAN + STD * torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    fixed = Denoiser(GaussianEps(sch, MEAN, STD), sch)
    for v, variance in ((1.0, "fixed_large"), (0.0, "fixed_small")):
        a = vlb_terms(learned(sch, v), x0, PerSampleNoise(range(8)), "learned", clip_denoised=False)
        b = vlb_terms(fixed, x0, PerSampleNoise(range(8)), variance, clip_denoised=False)
        assert torch.equal(a["L_1:T-1"], b["L_1:T-1"]), variance


@pytest.mark.parametrize("steps", [None, 25])
@pytest.mark.parametrize("v, variance", [(1.0, "fixed_large"), (0.0, "fixed_small")])
def test_learned_variance_sampler_at_v_one_or_zero_is_the_fixed_sampler(v, variance, steps):
    """Full (T = 100) and respaced (25 steps) ancestral sampling with learned v = 1 / 0 is bitwise fixed_large / small."""
    sch = schedules.linear(T=100)
    noise_a, noise_b = PerSampleNoise(range(16)), PerSampleNoise(range(16))
    a = ddpm(learned(sch, v), noise_a.randn((32,)), noise_a, variance="learned", steps=steps, clip_denoised=False)
    b = ddpm(Denoiser(GaussianEps(sch, MEAN, STD), sch), noise_b.randn((32,)), noise_b, variance=variance, steps=steps,
             clip_denoised=False)
    assert torch.equal(a, b)
    c = ddpm(learned(sch, 0.5), noise_a.randn((32,)), noise_a, variance="learned", steps=steps, clip_denoised=False)
    assert not torch.allclose(a, c)  # v matters


def test_respaced_process_keeps_alphas_cumprod_at_its_steps_and_samples_the_gaussian():
    """Nichol & Dhariwal §4: the respaced betas give the original abar at the chosen steps; 50-step respaced DDPM
    with the exact eps reproduces the data's mean and standard deviation."""
    sch = schedules.linear()
    ts = sch.timesteps(50)[::-1]
    sub = sch.respace(ts)
    assert sub.T == 50
    assert torch.allclose(sub.alphas_cumprod.double(), sch.alphas_cumprod.double()[ts], rtol=1e-5)
    noise = PerSampleNoise(range(500))
    x = ddpm(Denoiser(GaussianEps(sch, MEAN, STD), sch), noise.randn((64,)), noise, variance="fixed_large", steps=50,
             clip_denoised=False)
    assert x.mean().item() == pytest.approx(MEAN, abs=0.015)
    assert x.std().item() == pytest.approx(STD, rel=0.05)


class TinyNet(nn.Module):
    """A 1x1 convolution with 2 C outputs whose output is kept for inspecting its gradient."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 1)

    def forward(self, x, label, **cond):
        self.out = self.conv(x) * (1 + label.float()[:, None, None, None] / 1000)
        self.out.retain_grad()
        return self.out


@pytest.mark.parametrize("loss", ["hybrid", "vlb"])
def test_hybrid_vlb_term_sends_no_gradient_into_the_mean(loss):
    """Nichol & Dhariwal §3.1: in L_hybrid, L_vlb trains only the variance half of the output (stop-gradient on
    the mean); in L_vlb alone both halves get gradients (the control)."""
    torch.manual_seed(0)
    sch = schedules.linear()
    net = TinyNet()
    denoiser = Denoiser(net, sch, learn_sigma=True)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    t = torch.randint(0, sch.T, (8,))
    t[0] = 0  # the decoder term too
    terms = diffusion_losses(denoiser, x0, t, torch.randn_like(x0), loss=loss)
    terms["vlb"].sum().backward()
    grad_mean, grad_v = net.out.grad.chunk(2, 1)
    assert grad_v.abs().sum() > 0
    assert (grad_mean.abs().sum() == 0) == (loss == "hybrid")
    if loss == "hybrid":  # the whole hybrid loss's gradient on the mean half is L_simple's
        net.out.grad = None
        terms = diffusion_losses(denoiser, x0, t, torch.full_like(x0, 0.5), loss=loss)
        terms["loss"].sum().backward()
        hybrid_mean = net.out.grad.chunk(2, 1)[0].clone()
        net.out.grad = None
        diffusion_losses(denoiser, x0, t, torch.full_like(x0, 0.5), loss="simple")["loss"].sum().backward()
        assert torch.allclose(hybrid_mean, net.out.grad.chunk(2, 1)[0], atol=1e-7, rtol=0)
        assert terms["loss"].detach().equal(terms["mse"].detach() + 0.001 * terms["vlb"].detach())


def test_loss_aware_timesteps_follow_eq_17_and_keep_the_last_values():
    s = LossAwareTimesteps(T=4, history=3, uniform_prob=0.0)
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([1.0, 1, 2, 2, 3, 3, 4]))
    assert torch.equal(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))  # histories not full: uniform
    s.update(torch.tensor([0, 1, 2, 3, 3, 3, 0]), torch.tensor([1.0, 2, 3, 4, 4, 6, 5]))
    assert s.values[0].tolist() == [1.0, 1.0, 5.0] and s.values[3].tolist() == [4.0, 4.0, 6.0]  # first in, first out
    s.update(torch.tensor([3]), torch.tensor([8.0]))
    assert s.values[3].tolist() == [4.0, 6.0, 8.0]
    rms = torch.tensor([(27 / 3) ** 0.5, 2.0, 3.0, (116 / 3) ** 0.5], dtype=torch.float64)
    assert torch.allclose(s.probs(), rms / rms.sum())
    t, w = s.sample(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=4).double() / 20000
    assert torch.allclose(freq, rms / rms.sum(), atol=0.015)
    assert torch.allclose(w.double(), 1 / (4 * s.probs()[t]))
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])  # E_{t~p}[w_t L_t] is the uniform mean of L_t
    assert (s.probs() * (1 / (4 * s.probs())) * losses.double()).sum().item() == pytest.approx(losses.mean().item())
    copy = LossAwareTimesteps(T=4, history=3)
    copy.load_state_dict(s.state_dict())
    assert torch.equal(copy.values, s.values) and torch.equal(copy.counts, s.counts)
    with pytest.raises(ValueError, match="module.timestep_history"):
        LossAwareTimesteps(T=4, history=2).load_state_dict(s.state_dict())


def test_guidance_passes_the_conditional_learned_variance_through():
    class Conditional(nn.Module):
        num_classes = 3

        def forward(self, x, label, y=None):
            return torch.cat([x * 0 + y[:, None, None, None], x * 0 + y[:, None, None, None] / 10], 1)

    sch = schedules.linear()
    x, t, y = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2])
    eps, v = ClassifierFree(Denoiser(Conditional(), sch, learn_sigma=True), w=2.0).eps_and_v(x, t, y=y)
    assert torch.allclose(v, (y[:, None, None, None] / 10 + 1).expand_as(x) / 2)
    assert torch.allclose(eps, (3 * y - 2 * 3)[:, None, None, None].float().expand_as(x))


# ---- through the LightningModule and train() -------------------------------------------------------------------

LEARNED = ["model.learn_sigma=true", "module.loss=vlb", "module.timestep_sampler=loss_aware", "module.timestep_history=2",
           "schedule.T=4", "sampler=ddpm", "sampler.variance=learned", "sampler.steps=null",
           "callbacks.samples.every_n_steps=0"]


def _weights(path):
    ckpt = torch.load(path, weights_only=False)
    return ckpt["current_model_state"], ckpt.get("loss_aware_timesteps")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests below: bitwise comparisons need the same reductions
    train(compose_cfg(LEARNED, root))
    torch.set_num_threads(n)
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_resume_with_loss_aware_timesteps_is_exact(straight, tmp_path):
    """A run stopped at step 2 and resumed to 4 ends bitwise where the straight run ends; resuming without the
    saved timestep history (the control) does not."""
    train(compose_cfg([*LEARNED, "trainer.max_steps=2"], tmp_path / "half"))
    half = tmp_path / "half" / "checkpoints" / "last.ckpt"
    assert _weights(half)[1]["counts"].min() >= 2  # the history is full: p_t is no longer uniform
    train(compose_cfg([*LEARNED, f"ckpt_path={half}"], tmp_path / "resumed"))
    (a, ha), (b, hb) = _weights(straight), _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ha["values"], hb["values"])

    ckpt = torch.load(half, weights_only=False)
    del ckpt["loss_aware_timesteps"]
    torch.save(ckpt, tmp_path / "no_history.ckpt")
    train(compose_cfg([*LEARNED, f"ckpt_path={tmp_path / 'no_history.ckpt'}"], tmp_path / "control"))
    c, _ = _weights(tmp_path / "control" / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_learned_variance_checkpoint_round_trips_and_samples_with_every_compatible_sampler(straight):
    model = load_model(straight)
    assert model.denoiser.learn_sigma and model.hparams.loss == "vlb"
    assert model.net.out[-1].out_channels == 2 * model.hparams.channels
    samplers = {
        "ddpm_learned": {"variance": "learned"},
        "ddpm_learned_respaced": {"variance": "learned", "steps": 2},
        "ddpm_fixed_large": {"variance": "fixed_large"},
        "ddim": {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "steps": 3},
        "ode": {"_target_": "ddpm_lightning.diffusion.samplers.ode", "method": "euler", "steps": 3},
        "pc": {"_target_": "ddpm_lightning.diffusion.samplers.pc", "steps": 3},
    }
    for name, options in samplers.items():
        cfg = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, **options}
        x = model.sample(range(3), sampler=cfg)
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all(), name
        assert torch.equal(x[1:], model.sample(range(1, 3), sampler=cfg)), name  # the same seed, the same image
    again = load_model(straight)
    cfg = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "variance": "learned"}
    assert torch.equal(model.sample(range(2), sampler=cfg), again.sample(range(2), sampler=cfg))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["module.loss=vlb", "module.vlb_variance=learned"], "module.vlb_variance"),
        (["module.loss=vlb", "schedule=vp_sde"], "module.loss=vlb"),
        (["module.loss=hybrid"], "model.learn_sigma"),
        (["module.loss=l1"], "module.loss"),
        (["sampler=ddpm", "sampler.variance=learned"], "sampler.variance=learned"),
        (["model.learn_sigma=true", "schedule=vp_sde"], "model.learn_sigma"),
        (["model.learn_sigma=true", "module.loss=hybrid", "module.timestep_sampler=loss_aware"], "module.timestep_sampler"),
        (["module.timestep_sampler=importance"], "module.timestep_sampler"),
    ],
)
def test_incompatible_settings_stop_before_training(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(compose_cfg(overrides).module)


def test_learned_sampler_refused_for_a_fixed_variance_model():
    module = build(compose_cfg([]).module)
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "variance": "learned"}
    with pytest.raises(ValueError, match="model.learn_sigma"):
        module.sample(range(2), sampler=sampler)
    with pytest.raises(ValueError, match="learn_sigma"):
        check_compatible(build(compose_cfg(["sampler=ddpm", "sampler.variance=learned"]).sampler), module.schedule)


# ---- L_vlb with fixed variances (Ho et al. 2020 Table 2, "L, fixed isotropic Sigma") ------------------------------


class Constant(nn.Module):
    """A network whose eps-output is a given tensor."""

    def __init__(self, out: Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, label, **cond):
        return self.out


@pytest.mark.parametrize("vlb_variance", ["fixed_large", "fixed_small"])
def test_fixed_variance_vlb_loss_is_eps_mse_weighted_as_ho_eq_12(vlb_variance):
    """With p's variance fixed at sigma_t^2, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps -
    eps_theta||^2 + C (Ho et al. eq. 12): the training loss's change when eps_theta moves off the true eps by d is
    that weight times ||d||^2, at every t > 1, and the weights are the closed form from the betas alone."""
    sch = schedules.linear()
    betas = schedules.linear_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    sigma2 = betas if vlb_variance == "fixed_large" else betas * (1 - abar_prev) / (1 - abar)
    closed = betas**2 / (2 * sigma2 * (1 - betas) * (1 - abar))
    weights = vlb_eps_weights(sch, vlb_variance)
    assert torch.isnan(weights[0]) and torch.allclose(weights[1:], closed[1:], rtol=1e-5)
    if vlb_variance == "fixed_large":  # beta_t / (2 alpha_t (1 - abar_t)): 1/2 at t = 1 ... about 0.01 at t = T
        assert weights[-1].item() == pytest.approx(0.02 / (2 * 0.98 * (1 - abar[-1].item())), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    d = 0.1 * torch.randn(x0.shape, generator=g)
    D = x0[0].numel()

    def nats(out):
        terms = diffusion_losses(Denoiser(Constant(out), sch), x0, t, eps, loss="vlb", vlb_variance=vlb_variance)
        assert torch.equal(terms["loss"], terms["vlb"])
        return terms["vlb"].double() / 1000 * D * math.log(2)  # T L_{t-1} in bits/dim back to L_{t-1} in nats

    change = nats(eps + d) - nats(eps)
    want = closed[t] * d.double().pow(2).flatten(1).sum(1)
    assert torch.allclose(change, want, rtol=2e-3), (change, want)


def test_fixed_variance_vlb_trains_through_the_module():
    """module.loss=vlb without learned variances builds, and its loss sends gradients to the network."""
    module = build(compose_cfg(["module.loss=vlb", "module.vlb_variance=fixed_small"]).module)
    assert not module.denoiser.learn_sigma and module.hparams.vlb_variance == "fixed_small"
    x0 = torch.rand(4, *module.data_shape) * 2 - 1
    terms, _ = module._loss(x0)
    assert torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
