"""Sample quality of a digits checkpoint (experiment=digits, cfg_digits, ...), judged as in time_to_quality.py.

    python benchmarks/digits_quality.py outputs/runs/<run>/checkpoints/last.ckpt [--samples 500] [--ddim-steps 50]
    python benchmarks/digits_quality.py <cfg_digits run>/checkpoints/last.ckpt --w 1    # classifier-free guided

Draws `--samples` images with DDIM (`--ddim-steps`, x_0 clipped) from the EMA weights, seeds 0, 1, ...; with
`--w` (a class-conditional model) image i is asked for class i % 10 under classifier-free guidance of weight w.
Reports FD-digits (Frechet distance in the hidden features of an MLP digit classifier trained on the real
training digits, against the real validation digits; lower is better), the judge's mean confidence and, with
`--w`, how often the judge sees the requested class. JSON to benchmarks/results/digits_quality_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from time_to_quality import DigitJudge, digits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--w", type=float, default=None, help="classifier-free guidance weight (class-conditional models)")
    p.add_argument("--name", default=None, help="results file suffix (default: the run directory's name)")
    args = p.parse_args()

    from ddpm_lightning.loading import load_model

    torch.manual_seed(0)
    x_train, y_train, x_val = digits()
    judge = DigitJudge(x_train, y_train)
    model = load_model(args.ckpt)
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": args.ddim_steps, "clip_denoised": True}
    seeds = list(range(args.samples))
    cond = {}
    if args.w is not None:
        cond = {"labels": [i % 10 for i in seeds],
                "guidance": {"_target_": "ddpm_lightning.diffusion.guidance.ClassifierFree", "_partial_": True, "w": args.w}}
    name = args.name or args.ckpt.resolve().parent.parent.name
    t0 = time.perf_counter()
    images = torch.cat([model.sample(seeds[a : a + 250], sampler=sampler,
                                     **({k: (v[a : a + 250] if k == "labels" else v) for k, v in cond.items()}))
                        for a in range(0, len(seeds), 250)])
    result = {
        "run": name, "global_step": model.global_step_loaded, "samples": args.samples,
        "sampler": f"ddim{args.ddim_steps}", "guidance_w": args.w,
        "fd_digits": judge.frechet(images, x_val), "confidence": judge.confidence(images),
        "fd_digits_real_train_vs_val": judge.frechet(x_train[: args.samples], x_val),
        "sampling_s": time.perf_counter() - t0, "machine": common.machine(),
    }
    if args.w is not None:
        predicted = judge.clf.predict(judge._flat(images))
        result["accuracy"] = float((torch.as_tensor(predicted) == torch.tensor(cond["labels"])).float().mean())
    out = Path(__file__).resolve().parent / "results" / f"digits_quality_{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
