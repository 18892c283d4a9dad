"""Several ControlNets over one locked base (Zhang et al. 2023 Sec. 3.5): the residuals of the branches are summed,
each times its own conditioning scale (exactly base + s1 r1 + s2 r2), a branch at scale 0 leaves the other alone,
ControlNets trained on different bases are refused before any compute, and evaluate.py samples under several
conditions (ckpt_path plus control.ckpts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.config import compose_cfg, eval_cfg
from ddpm_lightning.control.module import split_hints
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.guidance import ClassifierFree
from ddpm_lightning.diffusion.schedules import linear
from ddpm_lightning.loading import combine_controlnets, load_controlnets, load_model
from ddpm_lightning.nets.controlnet import MultiControlledUNet
from ddpm_lightning.tasks import evaluate, train
from ddpm_lightning.training.module import DiffusionModule

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = {
    "_target_": "ddpm_lightning.nets.UNet", "in_channels": 1, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
    "attn_resolutions": [], "dropout": 0.0, "image_size": 8, "norm_groups": 8, "num_classes": 3,
}
CONDITIONS = {
    "lowres": {"_target_": "ddpm_lightning.control.conditions.LowRes", "factor": 2},
    "edges": {"_target_": "ddpm_lightning.control.conditions.Edges"},
    "mask": {"_target_": "ddpm_lightning.control.conditions.Mask"},
}
SAMPLER = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 3}


def controlnet_module(condition: str, base_sha256: str = "same", seed: int = 1) -> DiffusionModule:
    """A ControlNet model on the random base of seed 0 (non-zero weights), its branch moved away from zero."""
    net = {"_target_": "ddpm_lightning.nets.controlnet.ControlledUNet", "_recursive_": False, "base": UNET,
           "condition": CONDITIONS[condition], "base_sha256": base_sha256}
    module = DiffusionModule(net=net, schedule={"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 20},
                             sampler=SAMPLER, optimizer={"_target_": "torch.optim.Adam", "_partial_": True},
                             image_size=8, channels=1, p_uncond=0.1)
    g = torch.Generator().manual_seed(0)
    module.net.load_base({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in module.net.base.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.net.control.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 20, (n,), generator=g), torch.tensor([0, 2, 3][:n])


def test_two_controlnets_sum_their_scaled_residuals_over_one_base():
    one, two = controlnet_module("lowres"), controlnet_module("mask", seed=2)
    x, t, y = inputs()
    h1, h2 = one.net.condition(x.clamp(-1, 1)), two.net.condition(x.clamp(-1, 1), torch.Generator().manual_seed(0))
    r1, r2 = one.net.control(x, t, h1, y), two.net.control(x, t, h2, y)
    multi = MultiControlledUNet(one.net.base, [one.net.control, two.net.control], [one.net.condition, two.net.condition], [0.7, 1.3])
    base = one.net.base
    expected = base(x, t, y, control=[0.7 * a + 1.3 * b for a, b in zip(r1, r2)])
    torch.testing.assert_close(multi(x, t, y, hint=[h1, h2]), expected, rtol=0, atol=0)
    torch.testing.assert_close(multi(x, t, y, hint=[h1, h2], conditioning_scale=[1.0, 1.0]),
                               base(x, t, y, control=[a + b for a, b in zip(r1, r2)]), rtol=0, atol=0)
    alone = {k: multi(x, t, y, hint=[h1, h2], conditioning_scale=s) for k, s in (("1", [0.7, 0]), ("2", [0, 1.3]))}
    assert not torch.allclose(alone["1"], expected) and not torch.allclose(alone["2"], expected)
    # one branch at scale 0: the other ControlNet alone, bitwise; both at 0: the base
    torch.testing.assert_close(alone["1"], one.net(x, t, y, hint=h1, conditioning_scale=0.7), rtol=0, atol=0)
    torch.testing.assert_close(alone["2"], two.net(x, t, y, hint=h2, conditioning_scale=1.3), rtol=0, atol=0)
    torch.testing.assert_close(multi(x, t, y, hint=[h1, h2], conditioning_scale=0), base(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="list of 2 conditions"):
        multi(x, t, y, hint=h1)
    with pytest.raises(ValueError, match=r"expect \[3, 1, 8, 8\], \[3, 2, 8, 8\]"):
        multi(x, t, y, hint=[h1, h1])
    with pytest.raises(ValueError, match="control.scale: 3 conditioning scales for 2"):
        multi(x, t, y, hint=[h1, h2], conditioning_scale=[1, 1, 1])


def test_classifier_free_guidance_doubles_every_condition():
    one, two = controlnet_module("lowres"), controlnet_module("edges", seed=2)
    multi = combine_controlnets([one, two], ["a.ckpt", "b.ckpt"], [1.0, 0.5]).net
    denoiser = Denoiser(multi, linear(T=20))
    x, t, y = inputs()
    hint = [op(x.clamp(-1, 1)) for op in multi.conditions]
    guided = ClassifierFree(denoiser, w=2.0).eps(x, t, y=y, hint=hint)
    cond, uncond = denoiser.eps(x, t, y=y, hint=hint), denoiser.eps(x, t, y=torch.full_like(y, 3), hint=hint)
    torch.testing.assert_close(guided, 3 * cond - 2 * uncond, rtol=0, atol=1e-5)


def save(module: DiffusionModule, path) -> str:
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


def test_load_controlnets_samples_under_both_conditions_and_scale_zero_is_the_other_alone(tmp_path):
    a = save(controlnet_module("lowres"), tmp_path / "a.ckpt")
    b = save(controlnet_module("edges", seed=2), tmp_path / "b.ckpt")
    model = load_controlnets([a, b], scales=[1.0, 0.5], use_ema=False)
    assert isinstance(model.net, MultiControlledUNet) and model.net.scales == [1.0, 0.5]
    seeds = [0, 1]
    images = inputs(2)[0].clamp(-1, 1)
    hints = [split_hints(load_model(p, use_ema=False), images, seeds) for p in (a, b)]
    both = model.sample(seeds, sampler=SAMPLER, hint=hints)
    assert both.shape == (2, 1, 8, 8) and torch.isfinite(both).all()
    only_a = model.sample(seeds, sampler=SAMPLER, hint=hints, conditioning_scale=[1.0, 0.0])
    torch.testing.assert_close(only_a, load_model(a, use_ema=False).sample(seeds, sampler=SAMPLER, hint=hints[0]), rtol=0, atol=0)
    assert not torch.equal(both, only_a)
    only_b = model.sample(seeds, sampler=SAMPLER, hint=hints, conditioning_scale=[0.0, 0.5])
    torch.testing.assert_close(only_b, load_model(b, use_ema=False).sample(seeds, sampler=SAMPLER, hint=hints[1], conditioning_scale=0.5), rtol=0, atol=0)


def test_controlnets_of_different_bases_are_refused_naming_the_files(tmp_path):
    a = save(controlnet_module("lowres", base_sha256="1" * 64), tmp_path / "a.ckpt")
    b = save(controlnet_module("edges", base_sha256="2" * 64), tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"different base checkpoints.*a\.ckpt.*b\.ckpt"):
        load_controlnets([a, b], use_ema=False)
    plain = DiffusionModule(net={k: v for k, v in UNET.items()}, schedule={"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 20},
                            sampler=SAMPLER, optimizer={"_target_": "torch.optim.Adam", "_partial_": True}, image_size=8, channels=1)
    with pytest.raises(ValueError, match="c.ckpt is not a ControlNet"):
        load_controlnets([a, save(plain, tmp_path / "c.ckpt")], use_ema=False)


# --- the command, on two ControlNets trained for 2 steps on one tiny base ---------------------------------------

CN = ["experiment=controlnet_digits", "logger=none", "callbacks.samples.every_n_steps=0", "trainer.max_steps=2",
      "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2", "sampler.steps=3"]


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("multi")
    train(compose_cfg(["logger=none", "callbacks.samples.every_n_steps=0", "trainer.max_steps=2"], root / "base"))
    base = root / "base" / "checkpoints" / "last.ckpt"
    for condition in ("lowres", "edges"):
        train(compose_cfg(CN + [f"control={condition}", f"base_ckpt={base}"], root / condition))
    return root, base


def test_evaluate_samples_under_two_controlnets(controlnets, tmp_path):
    root, base = controlnets
    a, b = (root / c / "checkpoints" / "last.ckpt" for c in ("lowres", "edges"))
    result = evaluate(eval_cfg(a, tmp_path / "m", "num_samples=4", f"control.ckpts=[{b}]", "control.scale=[1.0,0.5]"))
    assert set(result["metrics"]) == {"adherence/0_lowres", "adherence/1_edges"}
    assert result["control"]["scale"] == [1.0, 0.5] and result["control"]["condition"] == ["LowRes", "Edges"]
    assert (tmp_path / "m" / "grid.png").is_file()
    # the edges ControlNet at scale 0: the lowres ControlNet alone, bitwise
    evaluate(eval_cfg(a, tmp_path / "z", "num_samples=4", f"control.ckpts=[{b}]", "control.scale=[1.0,0]"))
    evaluate(eval_cfg(a, tmp_path / "one", "num_samples=4"))
    arrays = {k: np.load(tmp_path / k / "samples.npz")["arr_0"] for k in ("m", "z", "one")}
    assert np.array_equal(arrays["z"], arrays["one"]) and arrays["m"].shape == arrays["one"].shape
    with pytest.raises(ValueError, match="control.scale: 3 conditioning scales for 2"):
        evaluate(eval_cfg(a, tmp_path / "bad", f"control.ckpts=[{b}]", "control.scale=[1,1,1]"))
    with pytest.raises(ValueError, match="control.folder"):
        evaluate(eval_cfg(a, tmp_path / "bad2", f"control.ckpts=[{b}]", f"control.folder={tmp_path}"))
    with pytest.raises(ValueError, match="is not a ControlNet"):
        evaluate(eval_cfg(a, tmp_path / "bad3", f"control.ckpts=[{base}]"))
