"""Sample quality against network evaluations (NFE) for each sampler, on a trained digits checkpoint.

    python benchmarks/sampler_nfe.py <run>/checkpoints/last.ckpt [--samples 500] [--nfe 5 10 20 50 100]

Samplers, each from its conf/sampler/<name>.yaml with `steps` set for the NFE budget: ancestral DDPM (conf
ddpm at 1000 NFE; below that DDIM with eta = 1, i.e. DDPM's posterior on a respaced chain), DDIM (eta = 0),
DPM-Solver++(2M), Heun (2 steps - 1 NFE: steps = (NFE + 1) // 2) and Euler ancestral; DDIM at
`--reference-steps` (500) stands for the probability-flow limit of the same model. Quality is the FD-digits of
benchmarks/time_to_quality.py (Frechet distance in the hidden features of an MLP digit classifier, against the
real validation digits; lower is better). The same seeds 0..samples-1 for every point. Writes
benchmarks/results/sampler_nfe.json and sampler_nfe.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402

# label: (conf/sampler file, overrides, steps for an NFE budget)
SAMPLERS = {
    "ddpm_ancestral": ("ddim", {"eta": 1.0}, lambda nfe: nfe),
    "ddim": ("ddim", {}, lambda nfe: nfe),
    "dpmpp_2m": ("dpmpp_2m", {}, lambda nfe: nfe),
    "heun": ("heun", {}, lambda nfe: (nfe + 1) // 2),
    "euler_ancestral": ("euler_ancestral", {}, lambda nfe: nfe),
}


def sampler_config(name: str, **overrides) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(common.CONF / "sampler" / f"{name}.yaml")), **overrides}


def measure(module, judge, x_val, sampler: dict, n: int, batch: int) -> dict:
    """FD-digits, NFE per image and seconds for n samples (seeds 0..n-1)."""
    from ddpm_lightning.training.module import count_nfe

    calls, handle = count_nfe(module)
    images, nfe = [], 0
    start = time.perf_counter()
    try:
        for a in range(0, n, batch):
            calls[0] = 0
            images.append(module.sample(range(a, min(a + batch, n)), sampler=sampler))
            nfe = calls[0]
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    x = torch.cat(images)
    return {"nfe": nfe, "fd_digits": judge.frechet(x, x_val), "confidence": judge.confidence(x), "seconds": seconds}


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in SAMPLERS:
        pts = sorted((r["nfe"], r["fd_digits"]) for r in rows if r["sampler"] == label)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in rows:
        if r["sampler"] in ("ddpm_1000", "ddim_reference"):
            ax.axhline(r["fd_digits"], ls="--", lw=0.8, color="gray")
            ax.annotate(f"{r['sampler']} ({r['nfe']} NFE)", (5, r["fd_digits"]), fontsize=7, va="bottom", color="gray")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per image (NFE)", ylabel="FD-digits (lower is better)")
    ax.set_title("Digits checkpoint: sample quality against NFE", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--reference-steps", type=int, default=500, help="DDIM steps of the probability-flow reference (0: none)")
    p.add_argument("--no-ddpm-1000", action="store_true", help="skip ancestral DDPM with all 1000 steps")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the existing JSON (a run cut short)")
    common.allocator_option(p)
    args = p.parse_args()
    if args.replot:
        return plot(json.loads((common.RESULTS / "sampler_nfe.json").read_text())["rows"], common.RESULTS / "sampler_nfe.png")
    common.set_allocator(args)
    from ddpm_lightning.loading import load_model

    module = load_model(args.ckpt)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    rows = [{"sampler": "real training digits", "nfe": 0, "fd_digits": judge.frechet(x_train, x_val), "confidence": judge.confidence(x_val)}]
    name = "sampler_nfe"
    common.RESULTS.mkdir(exist_ok=True)

    def add(label: str, cfg: dict) -> None:
        rows.append({"sampler": label, "steps": cfg["steps"] if "steps" in cfg else None,
                     **measure(module, judge, x_val, cfg, args.samples, args.batch)})
        print(rows[-1], flush=True)
        (common.RESULTS / f"{name}.json").write_text(json.dumps({"machine": common.machine(), "rows": rows}, indent=2))

    module.sample([0], sampler=sampler_config("ddim", steps=1))  # warm-up (kernels built or loaded) before timing
    # The points the targets compare come first, so that a run cut short still answers them.
    first = [("dpmpp_2m", 10), ("ddim", 50), ("dpmpp_2m", 20), ("reference", 0)]
    points = [(label, nfe) for nfe in args.nfe for label in args.samplers] + [("reference", 0)] * bool(args.reference_steps)
    for label, nfe in sorted(points, key=lambda p: first.index(p) if p in first else len(first)):
        if label == "reference":
            add("ddim_reference", sampler_config("ddim", steps=args.reference_steps))
            continue
        file, overrides, steps = SAMPLERS[label]
        add(label, sampler_config(file, **overrides, steps=steps(nfe)))
    if not args.no_ddpm_1000:
        add("ddpm_1000", sampler_config("ddpm"))
    by = {(r["sampler"], r["nfe"]): r["fd_digits"] for r in rows}
    targets = {}
    if ("dpmpp_2m", 10) in by and ("ddim", 50) in by:
        targets["dpmpp_2m@10 <= ddim@50"] = by[("dpmpp_2m", 10)] <= by[("ddim", 50)]
    ref = next((r["fd_digits"] for r in rows if r["sampler"] == "ddim_reference"), None)
    if ("dpmpp_2m", 20) in by and ref is not None:
        targets["dpmpp_2m@20 within 5% of ddim@reference"] = by[("dpmpp_2m", 20)] <= 1.05 * ref
    print(f"{args.samples} samples per point, {torch.get_num_threads()} threads; targets: {targets}")
    common.report(name, rows, ["sampler", "steps", "nfe", "fd_digits", "confidence", "seconds"])
    data = json.loads((common.RESULTS / f"{name}.json").read_text())
    data.update({"ckpt_global_step": module.global_step_loaded, "samples": args.samples, "targets": targets})
    (common.RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    plot(rows, common.RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
