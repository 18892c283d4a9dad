"""ControlNet on the digits: condition adherence and sample quality against training steps, per condition type.

    python benchmarks/controlnet.py BASE_CKPT [--conditions lowres edges mask] [--minutes 10] [--every 50]

For each condition, trains `experiment=controlnet_digits control=<condition>` on top of BASE_CKPT (a checkpoint
of `experiment=digits`) for at most `--minutes` of wall-clock (Lightning's max_time), keeping a checkpoint every
`--every` steps. Every checkpoint then samples `--samples` images with DDIM-50 under the conditions of the
validation digits (image i: validation digit i mod 180, masks drawn from seed i) and is scored by
- adherence: the mean squared difference between the condition and the condition operator applied to the sample
  (lowres: the 2x down-sampled sample against the 4x4 condition), as evaluate.py reports it;
- FD-digits: the Frechet distance of a digit classifier's hidden features (benchmarks/time_to_quality.py's judge)
  between the samples and the real validation digits.
The base model is the same network at conditioning_scale 0 (exactly the base). Writes
benchmarks/results/controlnet_digits.json and controlnet_digits.png (adherence against steps).
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


def train(base: str, condition: str, out: Path, minutes: float, every: int) -> float:
    """Train one ControlNet in a subprocess (as a user would run it); returns the wall time."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=controlnet_digits", f"control={condition}", f"base_ckpt={base}",
        f"paths.output_dir={out}", f"hydra.run.dir={out}", "trainer.max_steps=100000", f"+trainer.max_time=00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
        f"callbacks.checkpoint.every_n_train_steps={every}", "callbacks.checkpoint.save_top_k=-1",
        f"trainer.val_check_interval={every}", "callbacks.samples.every_n_steps=0", "logger=csv",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


@torch.no_grad()
def score(ckpt: Path, x_val: torch.Tensor, judge: DigitJudge, n: int, scale: float = 1.0) -> dict:
    from ddpm_lightning.control.module import split_hints
    from ddpm_lightning.loading import load_model

    model = load_model(ckpt)
    seeds = list(range(n))
    hints = split_hints(model, x_val[[i % len(x_val) for i in seeds]], seeds)
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 50}
    samples = torch.cat([model.sample(seeds[a : a + 250], sampler=sampler, hint=hints[a : a + 250], conditioning_scale=scale) for a in range(0, n, 250)])
    adherence = float(model.net.condition.adherence(samples, hints).mean())
    return {"step": model.global_step_loaded, "adherence": adherence, "fd_digits": judge.frechet(samples, x_val), "confidence": judge.confidence(samples)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        steps = [c["step"] for c in r["curve"]]
        ax.plot(steps, [c["adherence"] / r["base"]["adherence"] for c in r["curve"]], "o-", color=f"C{i}", label=name)
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="base model")
    ax.axhline(0.2, color="gray", ls=":", lw=1, label="target (1/5, lowres)")
    ax.set_xlabel("training step")
    ax.set_ylabel("adherence error / base model's")
    ax.set_yscale("log")
    ax.set_title("ControlNet on 8x8 digits (DDIM-50 samples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(conditions: list[str]) -> None:
    """controlnet_digits.json and .png from the per-condition results of runs made one condition at a time."""
    import json

    parts = [json.loads((common.RESULTS / f"controlnet_digits_{c}.json").read_text()) for c in conditions]
    data = {"machine": parts[0]["machine"], "rows": [r for p in parts for r in p["rows"]],
            "curves": {k: v for p in parts for k, v in p["curves"].items()}, "settings": {c: p["settings"] for c, p in zip(conditions, parts)}}
    (common.RESULTS / "controlnet_digits.json").write_text(json.dumps(data, indent=2))
    plot(data["curves"], common.RESULTS / "controlnet_digits.png")
    for c in conditions:
        (common.RESULTS / f"controlnet_digits_{c}.json").unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="checkpoint of experiment=digits")
    p.add_argument("--conditions", nargs="+", default=["lowres", "edges", "mask"])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--out", default="outputs/bench_controlnet")
    p.add_argument("--skip-training", action="store_true", help="score the runs already in --out")
    p.add_argument("--merge", action="store_true", help="only merge controlnet_digits_<condition>.json of separate runs")
    args = p.parse_args()
    if args.merge:
        return merge(args.conditions)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    results = {}
    for condition in args.conditions:
        out = Path(args.out).resolve() / condition
        wall = None if args.skip_training else train(args.base, condition, out, args.minutes, args.every)
        ckpts = sorted((out / "checkpoints").glob("step_*.ckpt"))
        curve = [score(c, x_val, judge, args.samples) for c in ckpts]
        last = out / "checkpoints" / "last.ckpt"
        final = score(last, x_val, judge, args.samples)
        base = score(last, x_val, judge, args.samples, scale=0.0)
        from ddpm_lightning.loading import load_model

        counts = load_model(last).net.parameter_counts()
        results[condition] = {"train_wall_s": wall, "steps": final["step"], "params": counts, "base": base, "final": final, "curve": curve}
        print(condition, results[condition]["base"], final, flush=True)
    rows = [
        {
            "condition": k, "steps": r["steps"], "train_wall_s": r["train_wall_s"], "base_adherence": r["base"]["adherence"],
            "adherence": r["final"]["adherence"], "adherence_ratio": r["final"]["adherence"] / r["base"]["adherence"],
            "base_fd_digits": r["base"]["fd_digits"], "fd_digits": r["final"]["fd_digits"],
            "fd_ratio": r["final"]["fd_digits"] / r["base"]["fd_digits"], "base_params": r["params"]["base"], "control_params": r["params"]["control"],
        }
        for k, r in results.items()
    ]
    name = "controlnet_digits" if set(args.conditions) == {"lowres", "edges", "mask"} else "controlnet_digits_" + "_".join(args.conditions)
    common.report(name, rows, list(rows[0]))
    import json

    data = json.loads((common.RESULTS / f"{name}.json").read_text())
    data["curves"] = {k: {"base": r["base"], "curve": r["curve"]} for k, r in results.items()}
    data["settings"] = {"samples": args.samples, "sampler": "ddim 50", "minutes": args.minutes, "every": args.every, "threads": torch.get_num_threads()}
    (common.RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    plot(results, common.RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
