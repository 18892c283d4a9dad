"""Editing on the digits: inpainting the lower half (replacement, RePaint, a mask ControlNet) and SDEdit's strength.

    python benchmarks/editing.py DIGITS_CKPT [--controlnet MASK_CKPT | --train-minutes 10] [--images 180] [--steps 100]

DIGITS_CKPT is a checkpoint of `experiment=digits`. The inputs are the held-out validation digits (the split of
DigitsDataModule, 180 images) with their lower half masked; each method fills it in, image i with seed i:
- replacement: the known pixels replaced by the input noised to every step (`Inpaint`, jump_n_sample=1);
- RePaint (Lugmayr et al. 2022): the same with jumps back, jump_length 10, jump_n_sample 10;
- ControlNet: a ControlNet trained with `control=mask` on DIGITS_CKPT (`--controlnet`, or trained here for
  `--train-minutes` with `experiment=controlnet_digits control=mask`), sampled under the masked digit as its
  condition; its known pixels are what the network makes of them (no replacement).
All three use DDPM ancestral steps (`--steps`, respaced). Scored by the judge of benchmarks/time_to_quality.py (an
MLP digit classifier trained on the real training digits): agreement, the share of results classified as the
source digit's class; FD-digits, the Frechet distance of its hidden features between the results and the
validation digits (lower is better); and the seconds per image. SDEdit (Meng et al. 2022) then edits the whole
validation digits at strengths 0.1 .. 1.0 with DDIM (`--steps`): faithfulness (the mean L2 distance of result to
input) against realism (FD-digits), plotted to benchmarks/results/editing_digits.png. Writes
benchmarks/results/editing_digits.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402

from ddpm_lightning.data.digits import load_digits_uint8  # noqa: E402
from ddpm_lightning.diffusion.editing import Inpaint, SDEdit  # noqa: E402
from ddpm_lightning.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]


def val_labels(split_seed: int = 0) -> torch.Tensor:
    """The classes of the validation digits of `digits()` (same split, same order)."""
    images, labels = load_digits_uint8(8)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    return labels[order[: round(0.1 * len(images))]]


def train_mask_controlnet(base: str, out: Path, minutes: float) -> Path:
    """`experiment=controlnet_digits control=mask` on `base` for `minutes` of wall-clock, in a subprocess."""
    seconds = max(int(minutes * 60), 1)
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=controlnet_digits", "control=mask", f"base_ckpt={base}",
        f"paths.output_dir={out}", f"hydra.run.dir={out}", "trainer.max_steps=100000",
        f"+trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
        "callbacks.samples.every_n_steps=0", "logger=none",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "checkpoints" / "last.ckpt"


def batched(fn, n: int, batch: int) -> tuple[torch.Tensor, float]:
    """fn(a, b) -> results of images a..b-1, over all n in batches; (results, seconds per image)."""
    t0 = time.perf_counter()
    out = torch.cat([fn(a, min(a + batch, n)) for a in range(0, n, batch)])
    return out, (time.perf_counter() - t0) / n


def inpainting(model, cn_model, x: torch.Tensor, mask: torch.Tensor, steps: int, batch: int) -> dict[str, tuple]:
    """The results of each method and its seconds per image."""
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "steps": steps}

    def inpaint(jump_length: int, jump_n_sample: int):
        return lambda a, b: model.sample(list(range(a, b)), sampler, edit=Inpaint(x[a:b], mask, jump_length, jump_n_sample))

    hints = torch.cat([x * mask, (2 * mask - 1).expand(len(x), 1, -1, -1)], 1)  # the Mask condition's layout
    controlnet = lambda a, b: cn_model.sample(list(range(a, b)), sampler, hint=hints[a:b])  # noqa: E731
    methods = {"replacement": inpaint(1, 1), "repaint_10x10": inpaint(10, 10), "controlnet_mask": controlnet}
    return {name: batched(fn, len(x), batch) for name, fn in methods.items()}


def sdedit_sweep(model, x: torch.Tensor, x_val: torch.Tensor, judge: DigitJudge, steps: int, batch: int) -> list[dict]:
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": steps}
    rows = []
    for s in STRENGTHS:
        out, per_image = batched(lambda a, b: model.sample(list(range(a, b)), sampler, edit=SDEdit(x[a:b], s)), len(x), batch)
        l2 = float((out - x).flatten(1).norm(dim=1).mean())
        rows.append({"strength": s, "l2_to_input": l2, "fd_digits": judge.frechet(out, x_val), "s_per_image": per_image})
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["l2_to_input"] for r in rows], [r["fd_digits"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{r['strength']:.1f}", (r["l2_to_input"], r["fd_digits"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean L2 distance to the input (faithfulness)")
    ax.set_ylabel("FD-digits to the validation digits (realism)")
    ax.set_title("SDEdit on 8x8 digits: strength 0.1 .. 1.0")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="checkpoint of experiment=digits")
    p.add_argument("--controlnet", help="checkpoint of experiment=controlnet_digits control=mask on BASE (else trained here)")
    p.add_argument("--train-minutes", type=float, default=10.0)
    p.add_argument("--images", type=int, default=180, help="the first validation digits (180: all)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=180)
    p.add_argument("--out", default="outputs/bench_editing")
    args = p.parse_args()
    x_train, y_train, x_val = digits()
    x, y = x_val[: args.images], val_labels()[: args.images]
    judge = DigitJudge(x_train, y_train)
    cn_ckpt = args.controlnet or train_mask_controlnet(args.base, Path(args.out).resolve() / "controlnet_mask", args.train_minutes)
    model, cn_model = load_model(args.base), load_model(cn_ckpt)
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0
    rows = []
    for name, (out, per_image) in inpainting(model, cn_model, x, mask, args.steps, args.batch).items():
        agreement = float((torch.from_numpy(judge.clf.predict(judge._flat(out))) == y).float().mean())
        rows.append({"method": name, "agreement": agreement, "fd_digits": judge.frechet(out, x_val), "s_per_image": per_image})
    common.report("editing_digits", rows, list(rows[0]))
    sweep = sdedit_sweep(model, x, x_val, judge, args.steps, args.batch)
    path = common.RESULTS / "editing_digits.json"
    data = json.loads(path.read_text())
    data["sdedit"] = sweep
    data["settings"] = {"images": len(x), "steps": args.steps, "controlnet": "given" if args.controlnet else "trained here", "train_minutes": None if args.controlnet else args.train_minutes,
                        "threads": torch.get_num_threads(), "inpainting_sampler": f"ddpm {args.steps}", "sdedit_sampler": f"ddim {args.steps}"}
    path.write_text(json.dumps(data, indent=2))
    plot(sweep, common.RESULTS / "editing_digits.png")


if __name__ == "__main__":
    main()
