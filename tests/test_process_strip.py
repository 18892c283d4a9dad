"""Pictures of the diffusion process on images (ddpm_lightning.plots): the forward strip x_t and the reverse
chain of one sample, and `evaluate.py process_strip=true`."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from helpers.config import CONF, compose_cfg
from ddpm_lightning.plots import data_images, forward_strip, reverse_chain
from ddpm_lightning.compose import build
from ddpm_lightning.tasks import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_module(*overrides):
    cfg = compose_cfg(list(overrides))
    OmegaConf.resolve(cfg)
    return build(cfg.module), build(cfg.data)


@pytest.mark.parametrize("schedule", ["linear", "ve_sde"])
def test_forward_strip_goes_from_the_data_to_noise(schedule):
    module, dm = tiny_module(f"schedule={schedule}", "sampler=ode", "sampler.method=euler", "sampler.steps=4")
    x0 = data_images(dm, 6)
    strip = forward_strip(module.schedule, x0, columns=5, seed=0).reshape(6, 6, *x0.shape[1:])
    assert torch.equal(strip[:, 0], x0)
    corr = [torch.corrcoef(torch.stack([strip[:, k].flatten(), x0.flatten()]))[0, 1].item() for k in range(6)]
    assert corr[1] > 0.99 and abs(corr[-1]) < 0.1, corr  # t_min: almost the data; t = T: noise
    assert all(b < a + 1e-3 for a, b in zip(corr, corr[1:])), corr
    assert strip[:, -1].std().item() == pytest.approx(1.0, rel=0.15)  # VE's sigma = 50 shown at unit scale


def test_reverse_chain_ends_at_the_sample():
    module, _ = tiny_module("sampler.steps=7")
    chain = reverse_chain(module, seed=3, frames=5)
    assert chain.shape == (5, *module.image_shape)
    assert torch.equal(chain[-1], module.sample([3])[0])
    assert chain[0].std().item() == pytest.approx(1.0, rel=0.3)  # the first step of the chain is still noise


def test_evaluate_writes_the_process_strips(tmp_path):
    train(compose_cfg(["trainer.max_steps=1", "callbacks.samples.every_n_steps=0"], tmp_path / "run"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'eval'}",
            "sampler=ddim", "sampler.steps=3", "num_samples=1", "metrics=[]", "trainer.accelerator=cpu", "process_strip=true",
        ])
    evaluate(cfg)
    with Image.open(tmp_path / "eval" / "forward_process.png") as im:
        assert im.size == (9 * 34 + 2, 8 * 34 + 2)  # 8 images x (data + 8 times), 8x8 pixels shown 4x, 2-pixel padding
    with Image.open(tmp_path / "eval" / "reverse_chain.png") as im:
        assert im.size == (9 * 34 + 2, 34 + 2)
