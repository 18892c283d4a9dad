"""Guidance against closed forms: a Gaussian mixture whose components are the classes has an exact conditional
and unconditional eps and an exact p(y | x_t), so guided samplers can be checked without training."""

import pytest
import torch

from helpers.config import compose_cfg
from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.guidance import ClassifierFree, ClassifierGuidance, drop_labels, resolve_labels
from ddpm_lightning.nets import EncoderClassifier, UNet
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ald, ddim, ddpm, dpmpp_2m, euler_ancestral, heun, ode, pc
from helpers.oracles import GaussianMixtureClassifier, GaussianMixtureEps

# Every sampler must work with every guidance wrapper: add new samplers here.
SAMPLERS = [
    pytest.param(ddpm, {"clip_denoised": False}, id="ddpm"),
    pytest.param(ddim, {"steps": None}, id="ddim"),  # every step of the schedule
    pytest.param(pc, {"steps": 250}, id="pc"),
    pytest.param(ode, {"method": "heun", "steps": 50}, id="ode"),
    pytest.param(ald, {"n_steps_each": 100, "step_lr": 2e-5}, id="ald"),  # on NCSN levels, see oracle()
    pytest.param(dpmpp_2m, {"steps": 20}, id="dpmpp_2m"),
    pytest.param(heun, {"steps": 20}, id="heun"),
    pytest.param(euler_ancestral, {"steps": 100}, id="euler_ancestral"),
]

# Three classes: components N(m_k, 0.5^2 I) in 4 dimensions, means on a circle in the first two.
STD, N, DIM = 0.5, 400, 4
MEANS = torch.zeros(3, DIM)
MEANS[:, :2] = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])


def oracle(T=250, sampler=None):
    # DDPM's linear schedule squeezed into T steps (betas x 1000 / T: about the same abar_T), to keep tests fast;
    # annealed Langevin runs on NCSN's geometric levels (Song & Ermon 2019), sigma_1 above the classes' spread.
    if sampler is ald:
        schedule = schedules.ncsn(sigma_max=3.0, sigma_min=0.01, L=10)
    else:
        schedule = schedules.linear(T=T, beta_start=0.1 / T, beta_end=20.0 / T)
    schedule.net_label = lambda t: t  # the oracle reads the step index itself
    mixture = GaussianMixtureEps(schedule, MEANS, STD)
    return Denoiser(mixture, schedule), GaussianMixtureClassifier(mixture)


def draw(denoiser, sampler, kwargs, y=0, n=N):
    noise = PerSampleNoise(range(n))
    return sampler(denoiser, noise.randn((DIM,)), noise, y=torch.full((n,), y), **kwargs)


@pytest.mark.parametrize("sampler, kwargs", SAMPLERS)
@pytest.mark.parametrize("guide", ["classifier_scale_1", "classifier_free_w_0"])
def test_guidance_reproduces_the_class_component(guide, sampler, kwargs):
    """Classifier guidance at scale 1 on the unconditional model (score + grad log p(y|x_t) = the conditional
    score, Bayes) and CFG at w = 0 both sample the chosen component N(m_y, s^2 I)."""
    denoiser, classifier = oracle(sampler=sampler)
    if guide == "classifier_scale_1":
        guided = ClassifierGuidance(denoiser, classifier, scale=1.0, conditional=False)
    else:
        guided = ClassifierFree(denoiser, w=0.0)
    x = draw(guided, sampler, kwargs, y=1)
    assert torch.allclose(x.mean(0), MEANS[1], atol=0.08), x.mean(0)  # standard error 0.025
    assert x.std(0).mean().item() == pytest.approx(STD, rel=0.06)  # standard error 1.8 %


@pytest.mark.parametrize("sampler, kwargs", SAMPLERS)
def test_stronger_guidance_concentrates_samples(sampler, kwargs):
    """Guidance tilts p(x | y) by p(y | x)^w: along the direction separating the classes the samples move away
    from the other classes and their spread shrinks as w grows; orthogonal to the class means (where p(y | x)
    is flat) nothing changes."""
    denoiser, classifier = oracle(sampler=sampler)
    cfg = {w: draw(ClassifierFree(denoiser, w), sampler, kwargs) for w in (0.0, 1.0, 4.0)}
    std0, std1, std4 = (cfg[w][:, 0].std().item() for w in (0.0, 1.0, 4.0))
    assert std4 < std1 < 0.9 * std0, (std0, std1, std4)
    assert cfg[0.0][:, 0].mean() < cfg[1.0][:, 0].mean() < cfg[4.0][:, 0].mean()
    for w in (1.0, 4.0):
        assert torch.allclose(cfg[w][:, 2:], cfg[0.0][:, 2:], atol=1e-4)
    # Classifier guidance of the conditional model at scale w is the same tilt: it agrees with CFG at w.
    cg = draw(ClassifierGuidance(denoiser, classifier, scale=4.0), sampler, kwargs)
    assert torch.allclose(cg, cfg[4.0], atol=1e-3)


def test_cfg_formula_null_label_and_w_zero():
    """eps~ = (1 + w) eps(x, c) - w eps(x, null), in one batched call whose second half has the null label;
    w = 0 gives the conditional model's output."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8, num_classes=10, dropout=0.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    calls = []
    net.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0].shape[0], kw["y"].clone())), with_kwargs=True)
    denoiser = Denoiser(net.eval(), schedules.linear())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        cond, uncond = denoiser.eps(x, t, y=y), denoiser.eps(x, t, y=torch.full_like(y, 10))
        calls.clear()
        guided = ClassifierFree(denoiser, w=2.0).eps(x, t, y=y)
        assert len(calls) == 1 and calls[0][0] == 6
        assert calls[0][1].tolist() == [0, 4, 9, 10, 10, 10]
        assert torch.allclose(guided, 3 * cond - 2 * uncond, atol=1e-5)
        assert torch.allclose(ClassifierFree(denoiser, w=0.0).eps(x, t, y=y), cond, atol=1e-6)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    # With the exact oracle, w = 0 is bit-for-bit the conditional eps.
    oracle_denoiser, _ = oracle()
    xs, ts, ys = torch.randn(5, DIM), torch.tensor([0, 10, 100, 200, 249]), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(ClassifierFree(oracle_denoiser, 0.0).eps(xs, ts, y=ys), oracle_denoiser.eps(xs, ts, y=ys))


class ConstantLogits(torch.nn.Module):
    """A classifier whose log p(y | x_t) does not depend on x_t."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

    def forward(self, x, label):
        return self.bias.expand(x.shape[0], 3) + 0 * x.sum(1, keepdim=True)


@pytest.mark.parametrize("sampler, kwargs", SAMPLERS)
def test_zero_gradient_classifier_leaves_samples_unchanged(sampler, kwargs):
    denoiser, _ = oracle(sampler=sampler)
    plain = draw(denoiser, sampler, kwargs, n=20)
    guided = draw(ClassifierGuidance(denoiser, ConstantLogits(), scale=10.0), sampler, kwargs, n=20)
    assert torch.equal(guided, plain)


def test_label_dropout_rate_and_training_labels():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.2, 10, torch.Generator().manual_seed(1))
    assert (dropped == 10).float().mean().item() == pytest.approx(0.2, abs=0.01)
    keep = dropped != 10
    assert torch.equal(dropped[keep], y[keep])

    from hydra.utils import instantiate

    module = instantiate(compose_cfg(["model.num_classes=10", "module.p_uncond=0.3"]).module)
    seen = []
    module.net.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["y"]), with_kwargs=True)
    x0, labels = torch.zeros(2000, 1, 8, 8), torch.randint(0, 10, (2000,))
    torch.manual_seed(0)
    module._loss((x0, labels))
    assert (seen[-1] == 10).float().mean().item() == pytest.approx(0.3, abs=0.03)
    module.validation_step((x0[:8], labels[:8]), 0)  # validation: the true labels, no dropout
    assert torch.equal(seen[-1], labels[:8])


def test_labels_at_sampling_time():
    assert resolve_labels("all", 64, 10) == ([k for k in range(10) for _ in range(6)], 6)
    assert resolve_labels([3, 1], 5, 10) == ([3, 1, 3, 1, 3], None)
    assert resolve_labels(None, 5, None) == (None, None)
    with pytest.raises(ValueError, match="model.num_classes"):
        resolve_labels("all", 8, None)
    with pytest.raises(ValueError, match="'all'"):
        resolve_labels("every", 8, 10)

    from hydra.utils import instantiate

    module = instantiate(compose_cfg(["model.num_classes=10", "sampler.steps=2"]).module)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        module.sample([0, 1], labels=[3, 10])
    with pytest.raises(ValueError, match="one label per sample"):
        module.sample([0, 1], labels=[3])
    unconditional = instantiate(compose_cfg(["sampler.steps=2"]).module)
    with pytest.raises(ValueError, match="model.num_classes"):
        unconditional.sample([0, 1], labels=[3, 1])
    with pytest.raises(ValueError, match="model.num_classes"):
        ClassifierFree(unconditional.denoiser)


def test_classifier_is_the_unet_encoder_with_a_pooled_head():
    kw = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8, dropout=0.0)
    clf, unet = EncoderClassifier(num_classes=10, **kw), UNet(**kw)
    encoder = {k: v.shape for k, v in unet.state_dict().items() if k.split(".")[0] in ("temb", "down", "mid")}
    assert {k: v.shape for k, v in clf.state_dict().items() if not k.startswith("head.")} == encoder
    assert clf(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).shape == (4, 10)
    with pytest.raises(ValueError, match="model.num_classes"):
        EncoderClassifier(num_classes=1, **kw)
