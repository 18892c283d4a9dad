"""Fixed against learned reverse variances on the digits (Nichol & Dhariwal 2021 §3.1, Table 1/2's finding):
L_simple with fixed variances, L_vlb with learned ones (loss-aware timesteps, §3.3) and the hybrid loss.

    python benchmarks/learned_variance.py --runs RUN_DIR [--steps 1600] [--samples 500]

Trains each objective with `python train.py experiment=digits` (8x8, 1600 steps, batch 128; a run whose
RUN_DIR/<objective>/checkpoints/last.ckpt exists is reused) one after the other, recording the training time,
then evaluates each EMA model: bits/dim on the 180 validation digits from the variational bound (Ho et al.
eq. 5 with the model's variances: fixed_large for L_simple, learned otherwise) and the digits Frechet distance
(benchmarks/time_to_quality.py's FD-digits judge, lower is better) of `--samples` images from DDPM ancestral
sampling with all 1000 steps and with the respaced 50-step process (Nichol & Dhariwal §4), fixed and learned
variances, and DDIM-50 (eps only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "simple": [],
    "vlb": ["model.learn_sigma=true", "module.loss=vlb", "module.timestep_sampler=loss_aware", "sampler.variance=learned"],
    "hybrid": ["model.learn_sigma=true", "module.loss=hybrid", "sampler.variance=learned"],
}


def train_run(name: str, out: Path, steps: int) -> float | None:
    """Train one objective into out/<name>; returns the wall-clock seconds (None when reused)."""
    run = out / name
    if (run / "checkpoints" / "last.ckpt").is_file():
        return None
    cmd = [sys.executable, "train.py", "experiment=digits", f"trainer.max_steps={steps}", "logger=csv",
           f"paths.output_dir={run}", f"hydra.run.dir={run}", *OBJECTIVES[name]]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    (run / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="directory of the training runs (one per objective)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args()
    for name in OBJECTIVES:
        train_run(name, args.runs, args.steps)
    if args.train_only:
        return
    evaluate(args)


if __name__ == "__main__":
    main()
