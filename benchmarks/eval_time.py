"""Time per 1,000 samples of evaluate.py's sampling loop for a model config, extrapolated from a few steps.

    python benchmarks/eval_time.py --model unet_small --image-size 16 --batch 250 --timed-steps 5

Times `--timed-steps` network evaluations of DDPM (1000 steps) and DDIM (50, 100 steps) on one batch of
`--batch` images (random weights: speed does not depend on them) and scales linearly to the whole chain and
to 1,000 images. Prints one line per sampler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from sample_throughput import time_loop  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="unet_small")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--timed-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from hydra.utils import instantiate

    from ddpm_lightning.evaluation import sample_shard

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={a.model}", f"data.image_size={a.image_size}", "paths.output_dir=/tmp"])
    module = instantiate(cfg.module).eval()
    samplers = {
        "ddpm-1000": ({"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True}, 1000),
        "ddim-50": ({"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 50}, 50),
        "ddim-100": ({"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 100}, 100),
    }
    for name, (sampler, nfe) in samplers.items():
        fn = instantiate(sampler)
        per_step = time_loop(module.net, lambda: sample_shard(module, fn, 0, a.batch, a.batch), a.timed_steps)
        per_1000 = per_step * nfe * 1000 / a.batch
        print(f"{a.model} {a.image_size}x{a.image_size} {name}: {per_step:.3f} s per step at batch {a.batch} "
              f"-> {per_1000:.0f} s ({per_1000 / 3600:.2f} h) per 1,000 samples (extrapolated from {a.timed_steps} steps)")


if __name__ == "__main__":
    main()
