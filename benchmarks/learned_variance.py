"""Fixed against learned reverse variances on the digits (Nichol & Dhariwal 2021 §3.1, Table 1/2's finding):
L_simple with fixed variances, L_vlb with learned ones (loss-aware timesteps, §3.3), the hybrid loss, and L_vlb
with fixed variances beta_t and uniform t (Ho et al. 2020 Table 2, "L, fixed isotropic Sigma"; `vlb_fixed`).

    python benchmarks/learned_variance.py --runs RUN_DIR [--steps 1600] [--samples 500] [--only vlb_fixed]

Trains each objective with `python train.py experiment=digits` (8x8, batch 128, `--steps` steps; a run whose
RUN_DIR/<objective>/checkpoints/last.ckpt exists is reused), all side by side with `--threads` threads
each, recording the training times,
then evaluates each EMA model: bits/dim on the 180 validation digits from the variational bound (Ho et al.
eq. 5 with the model's variances: fixed_large for L_simple and vlb_fixed, learned otherwise) and the digits Frechet distance
(benchmarks/time_to_quality.py's FD-digits judge, lower is better) of `--samples` images from the respaced
50-step DDPM ancestral sampler (Nichol & Dhariwal §4) with fixed and learned variances, and DDIM-50 (eps only).
The evaluations also run side by side. Writes benchmarks/results/learned_variance.json.
"""

from __future__ import annotations

import argparse
import json
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
    "vlb_fixed": ["module.loss=vlb", "module.vlb_variance=fixed_large"],
}


def train_runs(out: Path, steps: int, threads: int, only: list[str]) -> None:
    """Train every objective of `only` whose out/<name> has no last.ckpt yet, all at once (each with `threads`
    threads), and write each run's wall-clock seconds to out/<name>/train_seconds.txt."""
    procs = {}
    for name, overrides in OBJECTIVES.items():
        run = out / name
        if name not in only or (run / "checkpoints" / "last.ckpt").is_file():
            continue
        cmd = [sys.executable, "train.py", "experiment=digits", f"trainer.max_steps={steps}", "logger=csv",
               f"paths.output_dir={run}", f"hydra.run.dir={run}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run.mkdir(parents=True, exist_ok=True)
        log = open(run / "stdout.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
    while procs:  # each run's time ends when it ends, whatever the order
        for name, (proc, start) in list(procs.items()):
            if proc.poll() is None:
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"training {name} failed: see {out / name / 'stdout.log'}")
            (out / name / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
            del procs[name]
        time.sleep(1)


SAMPLERS = {  # name: (sampler options, objectives it applies to)
    "ddpm50_fixed_large": ({"variance": "fixed_large", "steps": 50}, ("simple", "vlb", "hybrid", "vlb_fixed")),
    "ddpm50_fixed_small": ({"variance": "fixed_small", "steps": 50}, ("simple", "vlb", "hybrid", "vlb_fixed")),
    "ddpm50_learned": ({"variance": "learned", "steps": 50}, ("vlb", "hybrid")),
    "ddim50": ({"_target_": "ddpm_lightning.diffusion.samplers.ddim", "steps": 50, "eta": 0.0}, ("simple", "vlb", "hybrid", "vlb_fixed")),
}


def evaluate_run(name: str, out: Path, samples: int, nll_images: int) -> dict:
    """Bits/dim (variational bound, the model's own variances) and FD-digits of each applicable sampler."""
    from ddpm_lightning.diffusion.likelihood import bits_per_dim
    from ddpm_lightning.loading import load_model

    model = load_model(out / name / "checkpoints" / "last.ckpt")
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    row = {"objective": name, "steps": model.global_step_loaded, "learn_sigma": model.denoiser.learn_sigma}
    seconds = out / name / "train_seconds.txt"
    row["train_seconds"] = float(seconds.read_text()) if seconds.is_file() else None
    start = time.perf_counter()
    nll = bits_per_dim(model, x_val[:nll_images], estimators=["vlb"])
    row.update({"bpd": nll["vlb/bpd"], "bpd_L_0": nll["vlb/L_0"], "bpd_L_1:T-1": nll["vlb/L_1:T-1"],
                "vlb_variance": "learned" if model.denoiser.learn_sigma else model.hparams.get("vlb_variance", "fixed_large"),
                "nll_seconds": time.perf_counter() - start})
    for sampler, (options, objectives) in SAMPLERS.items():
        if name in objectives:
            cfg = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, **options}
            x = torch.cat([model.sample(range(i, min(i + 250, samples)), sampler=cfg) for i in range(0, samples, 250)])
            row[f"fd_{sampler}"] = judge.frechet(x, x_val)
    (out / name / "eval.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="directory of the training runs (one per objective)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--samples", type=int, default=500, help="samples per sampler for FD-digits")
    p.add_argument("--nll-images", type=int, default=180, help="validation digits for bits/dim (180: all)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (the runs go side by side)")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--evaluate", choices=list(OBJECTIVES), help="evaluate this objective only (internal)")
    p.add_argument("--only", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES),
                   help="train and evaluate these objectives; the others' rows are kept from the results file")
    args = p.parse_args()
    if args.evaluate:
        evaluate_run(args.evaluate, args.runs, args.samples, args.nll_images)
        return
    train_runs(args.runs, args.steps, args.threads, args.only)
    if args.train_only:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    procs = [subprocess.Popen([sys.executable, __file__, "--runs", str(args.runs), "--samples", str(args.samples),
                               "--nll-images", str(args.nll_images), "--evaluate", name], env=env)
             for name in args.only if not (args.runs / name / "eval.json").is_file()]  # an evaluated run is reused
    if any(proc.wait() for proc in procs):
        raise RuntimeError("an evaluation failed")
    rows = [json.loads((args.runs / name / "eval.json").read_text()) for name in args.only]
    for row in rows:  # written by train_runs once every run had finished
        row["train_seconds"] = float((args.runs / row["objective"] / "train_seconds.txt").read_text())
    kept = common.RESULTS / "learned_variance.json"
    if kept.is_file():  # the other objectives' rows as last measured
        old = {r["objective"]: r for r in json.loads(kept.read_text())["rows"] if r.get("objective") in OBJECTIVES}
        rows = [old[name] if name in old and name not in args.only else next(r for r in rows if r["objective"] == name)
                for name in OBJECTIVES if name in old or name in args.only]
    x_train, y_train, x_val = digits()
    reference = DigitJudge(x_train, y_train).frechet(x_train, x_val)
    print(f"digits 8x8, {args.steps} steps each, batch 128; FD-digits of {args.samples} samples against the 180 "
          f"validation digits (training digits themselves: {reference:.3g}); bits/dim on {args.nll_images} validation digits")
    columns = ["objective", "steps", "train_seconds", "bpd", "bpd_L_0", "bpd_L_1:T-1", *(f"fd_{s}" for s in SAMPLERS)]
    common.report("learned_variance", rows + [{"objective": "real training digits (reference)", "fd_ddim50": reference}], columns)


if __name__ == "__main__":
    main()
