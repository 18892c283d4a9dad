"""Editing against diffusers on a checkpoint imported from a diffusers UNet2DModel with random weights, with the
same noise: RePaint equals diffusers' RePaintPipeline (RePaintScheduler, its jumps and mask), and SDEdit equals
DDIMScheduler steps started at the same timestep from the same noised input (diffusers' image-to-image)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ddpm_lightning.diffusion.editing import Inpaint, SDEdit
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ddim
from ddpm_lightning.interop import diffusers as io
from ddpm_lightning.interop.parity import GOOGLE_SCHEDULER, TRAIN_UNCONDITIONAL, diffusers_unet, save_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

T = 20
BETAS = {"beta_start": 0.005, "beta_end": 0.4, "beta_schedule": "linear", "num_train_timesteps": T}
TINY = {**TRAIN_UNCONDITIONAL, "layers_per_block": 1, "block_out_channels": [16, 16, 32], "norm_num_groups": 8,
        "sample_size": 8}
TOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    unet = diffusers_unet(TINY, seed=5)
    folder = save_pipeline(unet, tmp_path_factory.mktemp("pipe") / "pipe",
                           {**GOOGLE_SCHEDULER, **BETAS, "clip_sample": False})
    return unet, io.load_module(folder, channels_last=False)


def image_and_mask(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1  # the upper half is kept
    return image, mask


@pytest.mark.parametrize("jump_length, jump_n_sample", [(1, 1), (3, 2), (5, 3)])
def test_repaint_equals_diffusers_repaint_pipeline(imported, jump_length, jump_n_sample):
    unet, module = imported
    image, mask = image_and_mask()
    seed = 11
    pipe = diffusers.RePaintPipeline(unet=unet, scheduler=diffusers.RePaintScheduler(**BETAS, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(image, mask, num_inference_steps=T, eta=1.0, jump_length=jump_length, jump_n_sample=jump_n_sample,
                generator=torch.Generator().manual_seed(seed), output_type="np").images
    for sampler in ({"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "variance": "fixed_small", "clip_denoised": False},
                    {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": T, "eta": 1.0}):
        got = module.sample([seed], sampler=sampler, edit=Inpaint(image, mask, jump_length, jump_n_sample))
        got = (got / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert abs(got - want).max() < TOL, sampler["_target_"]
    assert ((got > 0) & (got < 1)).mean() > 0.5  # not saturated: the comparison sees the network
    assert abs(got[0, :4] - (image[0, 0, :4, :, None].numpy() / 2 + 0.5)).max() < 1e-6  # known pixels kept


@pytest.mark.parametrize("strength, steps", [(0.5, 10), (0.3, 10), (0.8, 5)])
def test_sdedit_equals_ddim_image_to_image_started_at_the_same_timestep(imported, strength, steps):
    unet, module = imported
    image, _ = image_and_mask(4)
    seed = 12
    scheduler = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[steps - int(steps * strength):]  # diffusers' img2img get_timesteps
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    x = scheduler.add_noise(image, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": steps, "spacing": "trailing"}
    got = module.sample([seed], sampler=sampler, edit=SDEdit(image, strength))
    assert (got - x.clamp(-1, 1)).abs().max() < TOL
    with torch.no_grad():  # and before the clamp to [-1, 1], where the random network's outputs mostly lie
        raw = SDEdit(image, strength)(partial(ddim, steps=steps, spacing="trailing"), module.denoiser, PerSampleNoise([seed]), (1, 8, 8))
    assert (raw - x).abs().max() < TOL * max(1.0, x.abs().max().item())
