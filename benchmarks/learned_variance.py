"""Fixed against learned reverse variances on the digits (Nichol & Dhariwal 2021 §3.1, Table 1/2's finding):
L_simple with fixed variances, L_vlb with learned ones (loss-aware timesteps, §3.3) and the hybrid loss.

    python benchmarks/learned_variance.py --runs RUN_DIR [--steps 1600] [--samples 500]

Trains each objective with `python train.py experiment=digits` (8x8, batch 128, `--steps` steps; a run whose
RUN_DIR/<objective>/checkpoints/last.ckpt exists is reused), the three side by side with `--threads` threads
each, recording the training times,
then evaluates each EMA model: bits/dim on the 180 validation digits from the variational bound (Ho et al.
eq. 5 with the model's variances: fixed_large for L_simple, learned otherwise) and the digits Frechet distance
(benchmarks/time_to_quality.py's FD-digits judge, lower is better) of `--samples` images from DDPM ancestral
sampling with all 1000 steps and with the respaced 50-step process (Nichol & Dhariwal §4), fixed and learned
variances, and DDIM-50 (eps only).
"""

from __future__ import annotations

import argparse
import os
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


def train_runs(out: Path, steps: int, threads: int) -> None:
    """Train every objective whose out/<name> has no last.ckpt yet, all at once (each with `threads` threads),
    and write each run's wall-clock seconds to out/<name>/train_seconds.txt."""
    procs = {}
    for name, overrides in OBJECTIVES.items():
        run = out / name
        if (run / "checkpoints" / "last.ckpt").is_file():
            continue
        cmd = [sys.executable, "train.py", "experiment=digits", f"trainer.max_steps={steps}", "logger=csv",
               f"paths.output_dir={run}", f"hydra.run.dir={run}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run.mkdir(parents=True, exist_ok=True)
        log = open(run / "stdout.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
    for name, (proc, start) in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"training {name} failed: see {out / name / 'stdout.log'}")
        (out / name / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="directory of the training runs (one per objective)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="threads per training process (they run side by side)")
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args()
    train_runs(args.runs, args.steps, args.threads)
    if args.train_only:
        return
    evaluate(args)


if __name__ == "__main__":
    main()
