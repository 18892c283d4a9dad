"""Sampler claims across training seeds: DPM-Solver++(2M) at 10 and 20 NFE against DDIM-50 on the digits DDPM.

The digits DDPM (experiment=digits, 1600 steps) is trained with several seeds.

    python benchmarks/sampler_seeds.py [--seeds 0 1 2] [--samples 2000] [--steps 1600]

Each seed trains the digits DDPM once (seed=<s>: its initialisation and training noise); its EMA weights draw
--samples images (seeds 0, 1, ...) with each sampler; FD-digits as in time_to_quality.py (lower is better). Reports
every seed's numbers, their mean and spread (min, max), on how many seeds each sampler beats DDIM-50, and the
real-vs-real floor (training against validation digits, as many images). JSON to benchmarks/results/sampler_seeds.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from objectives import train_run  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402

SAMPLERS = {
    "dpmpp_2m_10": {"_target_": "ddpm_lightning.diffusion.samplers.dpmpp_2m", "_partial_": True, "steps": 10,
                    "spacing": "log_snr", "clip_denoised": True},
    "dpmpp_2m_20": {"_target_": "ddpm_lightning.diffusion.samplers.dpmpp_2m", "_partial_": True, "steps": 20,
                    "spacing": "log_snr", "clip_denoised": True},
    "ddim_50": {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 50, "clip_denoised": True},
}


def score(ckpt: Path, judge: DigitJudge, x_val: torch.Tensor, samples: int) -> dict[str, float]:
    from ddpm_lightning.loading import load_model

    model = load_model(ckpt)
    return {name: judge.frechet(torch.cat([model.sample(range(a, min(a + 250, samples)), sampler=sampler)
                                           for a in range(0, samples, 250)]), x_val)
            for name, sampler in SAMPLERS.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1600, help="training steps (experiment=digits' 1600)")
    args = p.parse_args()
    torch.manual_seed(0)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    rows = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix=f"sampler_seeds_{seed}_"))
        try:
            run = train_run([f"seed={seed}"], [args.steps], out)
            rows.append({"seed": seed, **score(run["checkpoints"][args.steps], judge, x_val, args.samples)})
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(rows[-1], flush=True)
    for stat in (statistics.mean, min, max):
        rows.append({"seed": stat.__name__, **{name: stat(r[name] for r in rows[: len(args.seeds)]) for name in SAMPLERS}})
    per_seed = rows[: len(args.seeds)]
    rows.append({"seed": "seeds better than ddim_50", **{name: sum(r[name] < r["ddim_50"] for r in per_seed) for name in SAMPLERS}})
    rows.append({"seed": "real train vs val", "ddim_50": judge.frechet(x_train[: args.samples], x_val)})
    common.report("sampler_seeds", rows, ["seed", *SAMPLERS])

if __name__ == "__main__":
    main()
