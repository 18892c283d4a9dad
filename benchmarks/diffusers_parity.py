"""Output differences between diffusers and this package for the same weights (ddpm_lightning.interop.diffusers):
UNet2DModels with random weights in every layer imported (google/ddpm-cifar10-32's config and the test suite's
two other layouts), and the exported scheduler's betas, alphas_cumprod and DDPM ancestral steps. fp32, CPU.

    python benchmarks/diffusers_parity.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import diffusers  # noqa: E402

from ddpm_lightning.interop import parity as T  # noqa: E402  (the published configs and the random-weight helpers)

from hydra.utils import instantiate  # noqa: E402

from ddpm_lightning.interop import diffusers as io  # noqa: E402
from ddpm_lightning.diffusion.denoiser import Denoiser  # noqa: E402
from ddpm_lightning.diffusion.samplers import ddpm  # noqa: E402


def unet_rows(tmp: Path) -> list[dict]:
    rows = []
    for name, config in (("google/ddpm-cifar10-32", T.GOOGLE_CIFAR10), ("class-conditional 16px", T.CLASS_COND), ("64px, attention at 16 and 8", T.SIZE64)):
        unet = T.diffusers_unet(config)
        folder = T.save_pipeline(unet, tmp / name.replace("/", "_").replace(" ", "_"))
        module = io.load_module(folder, True if config.get("num_class_embeds") else None, channels_last=False)
        x, _ = T.inputs(unet, 4)
        t = torch.tensor([0, 250, 500, 999])
        cond = {"class_labels": torch.tensor([0, 1, 2, 3])} if config.get("num_class_embeds") else {}
        with torch.no_grad():
            want = unet(x, t, **cond).sample
            got = module.net(x, t.float(), y=cond.get("class_labels"))
        rows.append({
            "model": name, "parameters": sum(p.numel() for p in module.net.parameters()),
            "max_abs_diff": (got - want).abs().max().item(), "max_abs_output": want.abs().max().item(),
        })
    return rows


def scheduler_rows() -> list[dict]:
    rows = []
    for schedule, parameterization, variance in (
        ({"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}, "eps", "fixed_large"),
        ({"_target_": "ddpm_lightning.diffusion.schedules.cosine", "T": 1000, "s": 0.008, "max_beta": 0.999}, "v", "fixed_small"),
        ({"_target_": "ddpm_lightning.diffusion.schedules.scaled_linear", "T": 500, "beta_start": 8.5e-4, "beta_end": 0.012}, "x0", "fixed_small"),
    ):
        ours = instantiate(schedule)
        sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "variance": variance, "clip_denoised": True}
        theirs = diffusers.DDPMScheduler(**io.diffusers_scheduler_config(schedule, parameterization, sampler))
        g = torch.Generator().manual_seed(0)
        x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        z = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + k)) for k in range(3)]
        steps = []

        def keep(i, x_prev):
            steps.append(x_prev)
            if len(steps) == 3:
                raise StopIteration

        try:
            ddpm(Denoiser(T.FixedOutput(out), ours, parameterization), x, T.QueuedNoise(z), variance, True, callback=keep)
        except StopIteration:
            pass
        worst, x_t = 0.0, x
        for k, t in enumerate(range(ours.T - 1, ours.T - 4, -1)):
            step = theirs.step(out, t, x_t, generator=torch.Generator().manual_seed(100 + k)).prev_sample
            worst, x_t = max(worst, (step - steps[k]).abs().max().item()), steps[k]
        rows.append({
            "beta_schedule": theirs.config.beta_schedule, "T": ours.T, "prediction": parameterization, "variance": variance,
            "betas_max_abs_diff": (theirs.betas - ours.betas).abs().max().item(),
            "alphas_cumprod_max_abs_diff": (theirs.alphas_cumprod - ours.alphas_cumprod).abs().max().item(),
            "three_steps_max_abs_diff": worst,
        })
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        common.report("diffusers_parity_unet", unet_rows(Path(tmp)), ["model", "parameters", "max_abs_diff", "max_abs_output"])
    common.report("diffusers_parity_scheduler", scheduler_rows(), ["beta_schedule", "T", "prediction", "variance", "betas_max_abs_diff", "alphas_cumprod_max_abs_diff", "three_steps_max_abs_diff"])
