"""Sample grids of one trained model by every sampler at about equal network evaluations (NFE), and its
bits/dim from both estimators.

    python benchmarks/score_samplers.py CKPT OUT_DIR [--nfe 100] [--bpd-images 180]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lightning.data.digits import DigitsDataModule
from ddpm_lightning.images import save_grid
from ddpm_lightning.diffusion.likelihood import bits_per_dim
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ald, ddim, ddpm, ode, pc
from ddpm_lightning.diffusion.schedules import expand_as
from ddpm_lightning.loading import load_model


class CountingDenoiser:
    """The denoiser interface, counting the batched network evaluations."""

    def __init__(self, denoiser):
        self.inner, self.schedule, self.nfe = denoiser, denoiser.schedule, 0

    def eps(self, x, t, **cond):
        self.nfe += 1
        return self.inner.eps(x, t, **cond)

    def x0(self, x, t, **cond):
        return self.inner.x0_from_eps(x, t, self.eps(x, t, **cond))

    def x0_from_eps(self, x, t, eps):
        return self.inner.x0_from_eps(x, t, eps)

    def score(self, x, t, **cond):
        return -self.eps(x, t, **cond) / expand_as(self.schedule.sigma(t), x)


def samplers(nfe: int, discrete: bool) -> dict:
    out = {
        "ddim": (ddim, {"steps": nfe}),
        "pc_reverse_diffusion_langevin": (pc, {"steps": nfe // 2}),
        "pc_euler_maruyama": (pc, {"steps": nfe, "predictor": "euler_maruyama", "corrector": "none"}),
        "pc_ancestral": (pc, {"steps": nfe, "predictor": "ancestral", "corrector": "none"}),
        "ode_euler": (ode, {"method": "euler", "steps": nfe}),
        "ode_heun": (ode, {"method": "heun", "steps": nfe // 2}),
        "ode_rk45": (ode, {"method": "rk45", "rtol": 1e-3, "atol": 1e-3}),
        "ald": (ald, {"levels": 10, "n_steps_each": nfe // 10}),
    }
    if discrete:
        out["ddpm_1000"] = (ddpm, {})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--nfe", type=int, default=100)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--bpd-images", type=int, default=180)
    p.add_argument("--skip", default="")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.ckpt)
    results = {}
    for name, (fn, kw) in samplers(args.nfe, model.schedule.discrete).items():
        if name in args.skip.split(","):
            continue
        counting = CountingDenoiser(model.denoiser)
        noise = PerSampleNoise(range(args.samples))
        x_T = noise.randn(model.image_shape) * model.schedule.prior_std()
        start = time.perf_counter()
        with torch.no_grad():
            x = fn(counting, x_T, noise, **kw).clamp(-1, 1)
        save_grid(x, out / f"{name}.png", display_scale=4)
        results[name] = {"nfe": counting.nfe, "seconds": round(time.perf_counter() - start, 1), **kw}
        print(name, results[name], flush=True)
    if args.bpd_images:
        dm = DigitsDataModule(image_size=model.hparams.image_size, batch_size=args.bpd_images)
        dm.setup()
        test = dm.val_set.tensors[0][: args.bpd_images]
        start = time.perf_counter()
        results["bits_per_dim"] = bits_per_dim(model, test, rtol=1e-4, atol=1e-4)
        results["bits_per_dim"]["images"] = len(test)
        results["bits_per_dim"]["seconds"] = round(time.perf_counter() - start, 1)
        print(results["bits_per_dim"], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
