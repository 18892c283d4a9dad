"""Sample quality at equal wall-clock: ours against diffusers and denoising-diffusion-pytorch on the digits.

    python benchmarks/time_to_quality.py --budget 120 [--precision bf16]

Each implementation trains the same U-Net shape (conf/model/unet_small, resized to the 8x8 digits as in
experiment=digits) with its own idiomatic training step, Adam lr 1e-3, batch 128, linear schedule, for
`--budget` seconds of wall-clock (all in fp32, or all under bf16 autocast with `--precision bf16`), then
draws `--samples` images with DDIM-50 from its EMA weights.
Quality is judged by a digit classifier trained on the real training digits (scikit-learn MLP): the
Frechet distance between its hidden features of samples and of the real validation digits (lower is
better; "FD-digits") and the mean top-class confidence.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput  # noqa: E402

ARCH = {"ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}


def digits(split_seed: int = 0):
    """The digits as in DigitsDataModule: [-1, 1] tensors [N, 1, 8, 8], train and validation parts."""
    from ddpm_lightning.data.digits import load_digits_uint8
    from ddpm_lightning.images import to_model_range

    images, labels = load_digits_uint8(8)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    n_val = round(0.1 * len(images))
    x = to_model_range(images)
    return x[order[n_val:]], labels[order[n_val:]], x[order[:n_val]]


class DigitJudge:
    """An MLP classifier of real digits; its hidden layer is the feature space."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0).fit(self._flat(x), y.numpy())

    @staticmethod
    def _flat(x: torch.Tensor) -> np.ndarray:
        return x.reshape(len(x), -1).clamp(-1, 1).double().numpy()

    def features(self, x: torch.Tensor) -> np.ndarray:
        return np.maximum(self._flat(x) @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    def confidence(self, x: torch.Tensor) -> float:
        return float(self.clf.predict_proba(self._flat(x)).max(1).mean())

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from scipy import linalg

        fa, fb = self.features(a), self.features(b)
        mu1, mu2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def train_for(impl: str, x: torch.Tensor, budget: float, batch: int, precision: str) -> tuple[train_throughput.Run, int]:
    """Train `impl` for `budget` seconds of wall-clock on random batches of x; returns the run and its steps."""
    run = train_throughput.Run(impl, "unet_small", x[:batch].clone(), precision, arch=ARCH)
    g = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        run.x0.copy_(x[torch.randint(0, len(x), (batch,), generator=g)])
        run.step()
        steps += 1
    return run, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per implementation")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training precision; sampling is fp32")
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    rows = [{"impl": "real training digits (reference)", "steps": 0, "fd_digits": judge.frechet(x_train, x_val), "confidence": judge.confidence(x_val)}]
    for impl in ("ours", "diffusers", "denoising_diffusion_pytorch"):
        run, steps = train_for(impl, x_train, args.budget, args.batch, args.precision)
        samples = run.sample(args.samples)
        rows.append({"impl": impl, "params": common.count(run.net), "steps": steps, "fd_digits": judge.frechet(samples, x_val), "confidence": judge.confidence(samples)})
        print(rows[-1], flush=True)
    print(f"digits 8x8, {args.budget:.0f} s of {args.precision} training each, batch {args.batch}, {args.samples} DDIM-50 samples, {torch.get_num_threads()} threads")
    common.report("time_to_quality" + ("_bf16" if args.precision == "bf16" else ""), rows, ["impl", "params", "steps", "fd_digits", "confidence"])


if __name__ == "__main__":
    main()
