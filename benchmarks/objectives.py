"""Training objectives at equal steps on the embedded digits: eps, eps / v + min-SNR, EDM and flow matching.

The digits DDPM (experiment=digits: eps, L_simple) against eps + min-SNR, v + min-SNR, EDM and flow matching, on the
same network, data, batch and seed.

    python benchmarks/objectives.py [--steps 400 800 1600] [--samples 500] [--only edm flow]

Each objective trains the digits DDPM's run (experiment=digits, 1600 steps) once, keeping checkpoints at --steps;
each checkpoint's EMA weights draw --samples images (seeds 0, 1, ...) at 10 network evaluations (DPM-Solver++(2M),
10 steps) and 35 (Heun, 18 Karras levels), and with DDIM-50 (the sampler of the README's results); FD-digits
as in time_to_quality.py (lower is better). Training images/s is measured over the whole run. One JSON per
objective, benchmarks/results/objectives_<name>.json (written as each finishes), with `--keep DIR` the last
checkpoint of each, and a plot of FD-digits against steps, benchmarks/results/objectives.png. The quickstart
was to switch to an objective that reaches eps's FD-digits at 1600 steps in 800 (docs/objectives.md#the-quickstart).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402

OBJECTIVES = {
    "eps": [],  # experiment=digits as it is
    "eps_min_snr": ["module.weighting=min_snr"],
    "v_min_snr": ["module.parameterization=v", "module.weighting=min_snr"],
    "edm": ["schedule=edm", "module.parameterization=edm"],
    "flow": ["schedule=rectified_flow", "module.parameterization=flow"],
}
SAMPLERS = {  # (network evaluations, sampler config)
    "dpmpp_2m_10": (10, {"_target_": "ddpm_lightning.diffusion.samplers.dpmpp_2m", "_partial_": True, "steps": 10,
                         "spacing": "log_snr", "clip_denoised": True}),
    "heun_18": (35, {"_target_": "ddpm_lightning.diffusion.samplers.heun", "_partial_": True, "steps": 18,
                     "spacing": "karras", "clip_denoised": True}),
    "ddim_50": (50, {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 50,
                     "clip_denoised": True}),
}
RESULTS = Path(__file__).resolve().parent / "results"


def train_run(overrides: list[str], steps: list[int], out: Path) -> dict:
    """Train the digits DDPM's run (experiment=digits) with `overrides` (e.g. an objective's); its config, seconds
    and checkpoints at `steps`."""
    from ddpm_lightning.tasks import train

    every = functools.reduce(math.gcd, steps)  # a checkpoint interval that lands on every step asked for
    cfg = common.compose_train(["experiment=digits", *overrides, f"trainer.max_steps={max(steps)}", "logger=none",
                                f"callbacks.checkpoint.every_n_train_steps={every}", "callbacks.checkpoint.save_top_k=-1",
                                "callbacks.samples.every_n_steps=0", f"trainer.val_check_interval={max(steps)}"], out)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    return {"config": cfg, "seconds": seconds, "images_per_s": max(steps) * cfg.data.batch_size / seconds,
            "checkpoints": {s: out / "checkpoints" / f"step_{s:07d}.ckpt" for s in steps}}


def digits_judge(samples: int) -> tuple[DigitJudge, torch.Tensor, float]:
    """The judge (trained on the training digits, seed 0), the validation digits and the real-data floor: FD-digits of
    `samples` training digits against them."""
    torch.manual_seed(0)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    return judge, x_val, judge.frechet(x_train[:samples], x_val)


def judge_checkpoint(ckpt: Path, judge: DigitJudge, x_val: torch.Tensor, samples: int, samplers: Iterable[str] = SAMPLERS) -> dict:
    from ddpm_lightning.loading import load_model

    model = load_model(ckpt)
    row = {}
    for label in samplers:
        nfe, sampler = SAMPLERS[label]
        t0 = time.perf_counter()
        images = torch.cat([model.sample(range(a, min(a + 250, samples)), sampler=sampler) for a in range(0, samples, 250)])
        row[label] = {"nfe": nfe, "fd_digits": judge.frechet(images, x_val), "sampling_s": time.perf_counter() - t0}
    return row


def plot(rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, sampler in zip(axes, ("dpmpp_2m_10", "heun_18")):
        for name, r in rows.items():
            points = sorted((row["steps"], row["fd_digits"]) for row in r["rows"] if row["sampler"] == sampler)
            ax.plot(*zip(*points), marker="o", label=name)
        floor = next(iter(rows.values()))["fd_digits_real_train_vs_val"]
        ax.axhline(floor, color="gray", linestyle=":", label="real training digits")
        ax.set(xscale="log", yscale="log", xlabel="training steps", title=f"{sampler} ({SAMPLERS[sampler][0]} NFE)")
        ax.minorticks_off()
        ax.set_xticks([400, 800, 1600], ["400", "800", "1600"])
        ax.set_yticks([2.5, 3, 3.5, 4, 5], ["2.5", "3", "3.5", "4", "5"])
    axes[0].set_ylabel("FD-digits (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "objectives.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[400, 800, 1600])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--only", nargs="+", choices=sorted(OBJECTIVES), default=list(OBJECTIVES))
    p.add_argument("--keep", type=Path, help="folder to keep each run's last checkpoint in, as <objective>.ckpt")
    args = p.parse_args()
    judge, x_val, floor = digits_judge(args.samples)
    for name in args.only:
        out = Path(tempfile.mkdtemp(prefix=f"objectives_{name}_"))
        try:
            run = train_run(OBJECTIVES[name], sorted(args.steps), out)
            rows = [{"steps": s, "sampler": label, **r} for s, c in run["checkpoints"].items()
                    for label, r in judge_checkpoint(c, judge, x_val, args.samples).items()]
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(run["checkpoints"][max(args.steps)], args.keep / f"{name}.ckpt")
        finally:
            shutil.rmtree(out, ignore_errors=True)
        result = {"objective": name, "overrides": ["experiment=digits", *OBJECTIVES[name]], "samples": args.samples,
                  "train_seconds": run["seconds"], "train_images_per_s": run["images_per_s"], "rows": rows,
                  "fd_digits_real_train_vs_val": floor, "machine": common.machine(run["config"])}
        (RESULTS / f"objectives_{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1), flush=True)
    plot({name: json.loads(f.read_text()) for name in OBJECTIVES if (f := RESULTS / f"objectives_{name}.json").exists()})


if __name__ == "__main__":
    main()
