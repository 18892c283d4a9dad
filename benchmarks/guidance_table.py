"""Guidance on the digits: accuracy and diversity of class-conditional samples against the guidance strength.

    python benchmarks/guidance_table.py                       # trains both models first (about 15 min on 2 cores)
    python benchmarks/guidance_table.py --cfg-ckpt A.ckpt --classifier-ckpt B.ckpt

Trains (unless given) a class-conditional DDPM with label dropout (`experiment=cfg_digits`) and a noise-aware
classifier (`experiment=classifier_digits`), then draws `--samples` images (an equal number per class) with
DDIM for each setting:
- classifier-free guidance, eps~ = (1 + w) eps(x, c) - w eps(x), for w in --w;
- classifier guidance of the same network's unconditional (null-label) output, eps~ = eps(x) - scale sigma grad
  log p(y | x_t), for scale in --scales.
A separately trained judge (scikit-learn MLP on the real training digits, as in time_to_quality.py) scores
accuracy = P(judge's class == requested class); diversity is the mean pairwise L2 distance between samples of
the same class (pixels in [-1, 1]); FD-digits is the Frechet distance to the real validation digits in the
judge's hidden features (the real row: a class-balanced subset of the training digits, as many as the samples).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402


def train_run(experiment: str, out: Path, steps: int | None) -> Path:
    from ddpm_lightning.tasks import train

    overrides = [f"experiment={experiment}", "logger=none", "callbacks.progress.refresh_rate=0"]
    overrides += [f"trainer.max_steps={steps}", f"callbacks.checkpoint.every_n_train_steps={steps}"] if steps else []
    train(common.compose_train(overrides, out / experiment))
    return out / experiment / "checkpoints" / "last.ckpt"


def within_class_diversity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean pairwise L2 distance between samples of the same class, averaged over classes."""
    per_class = []
    for k in y.unique():
        f = x[y == k].flatten(1)
        n = len(f)
        if n > 1:
            per_class.append(torch.cdist(f, f).sum().item() / (n * (n - 1)))
    return sum(per_class) / len(per_class)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-ckpt", type=Path)
    p.add_argument("--classifier-ckpt", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "guidance_table")
    p.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the experiments')")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--scales", type=float, nargs="*", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    args = p.parse_args()

    from ddpm_lightning.data.digits import load_digits_uint8
    from ddpm_lightning.diffusion.guidance import ClassifierFree
    from ddpm_lightning.loading import classifier_guidance
    from ddpm_lightning.images import save_grid
    from ddpm_lightning.loading import load_model

    start = time.perf_counter()
    cfg_ckpt = args.cfg_ckpt or train_run("cfg_digits", args.out, args.steps)
    clf_ckpt = args.classifier_ckpt or (train_run("classifier_digits", args.out, args.steps) if args.scales else None)
    train_s = time.perf_counter() - start
    model = load_model(cfg_ckpt)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    # the validation labels, split as in digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    y_val = load_digits_uint8(8)[1][order[: len(x_val)]]
    per = args.samples // 10
    labels = torch.arange(10).repeat_interleave(per)
    seeds = range(len(labels))
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": args.ddim_steps}

    def row(kind: str, strength: float, images: torch.Tensor, y: torch.Tensor) -> dict:
        pred = torch.as_tensor(judge.clf.predict(judge._flat(images)))
        return {
            "guidance": kind, "strength": strength, "accuracy": float((pred == y).float().mean()),
            "diversity": within_class_diversity(images, y), "fd_digits": judge.frechet(images, x_val),
        }

    # held-out real digits: accuracy and diversity on the validation digits (unseen by the judge); their FD row
    # compares a class-balanced subset of the training digits of the samples' size with the validation digits
    real = torch.cat([torch.nonzero(y_train == k).flatten()[:per] for k in range(10)])
    rows = [row("real validation digits", float("nan"), x_val, y_val) | {"fd_digits": judge.frechet(x_train[real], x_val)}]
    settings = [("classifier-free w", w, lambda d, w=w: ClassifierFree(d, w)) for w in args.w]
    settings += [("classifier scale", s, lambda d, s=s: classifier_guidance(d, str(clf_ckpt), s, conditional=False)) for s in args.scales]
    for kind, strength, guidance in settings:
        t = time.perf_counter()
        images = model.sample(seeds, sampler=sampler, labels=labels, guidance=guidance)
        rows.append(row(kind, strength, images, labels) | {"sample_s": round(time.perf_counter() - t, 1)})
        save_grid(images.reshape(10, per, *images.shape[1:])[:, :10].flatten(0, 1), args.out / f"{kind.split()[0]}_{strength:g}.png", nrow=10, display_scale=4)
        print(rows[-1], flush=True)
    print(f"digits 8x8; models trained for {train_s:.0f} s; {len(labels)} DDIM-{args.ddim_steps} samples per row ({per} per class)")
    common.report("guidance_table", rows, ["guidance", "strength", "accuracy", "diversity", "fd_digits", "sample_s"])


if __name__ == "__main__":
    main()
