"""The routes the autotuner (ddpm_lightning.cpu.autotune) picks for a model's layers, with their timings, and what
measuring them costs: the first training step (which times every candidate) against the next ones.

    python benchmarks/routes.py --model unet_cifar10 --batch 16 --precision fp32 bf16

Decisions are measured afresh into a temporary cache folder (the user's route cache is neither read nor written).
Each row is one (layer, input) key: the candidates' median times (ms, forward + backward in training) and the
route taken. Writes benchmarks/results/routes_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402
from train_throughput import Run, batch_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first")
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    common.prepare_routes()
    os.environ["DDPM_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="routes-")
    from ddpm_lightning.cpu import autotune as routes

    rows, summary = [], []
    for precision in args.precision:
        run = Run("ours", args.model, batch_of(args, common.device()), precision)
        before = set(routes._decisions)
        start = time.perf_counter()
        run.step()  # measures every new (layer, input)
        first = time.perf_counter() - start
        steady = common.timed(run.step, args.steps)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            run.net.eval()(run.x0.contiguous(memory_format=torch.channels_last), torch.zeros(args.batch))  # sampling keys
        summary.append({"precision": precision, "first_step_s": first, "step_s": steady, "measuring_s": first - steady,
                        "keys": len(set(routes._decisions) - before)})
        for key in sorted(set(routes._decisions) - before):
            d = routes._decisions[key]
            rows.append({"precision": precision, "key": key, "route": d["route"], **{f"{k}_ms": v for k, v in d["ms"].items()}})
    columns = ["precision", "key", "route", "onednn_ms", "winograd_ms", "winograd_bf16_ms", "gemm_weight_grad_ms", "stock_ms", "fused_ms"]
    common.report(f"routes_{args.model}", rows, columns)
    for s in summary:
        print(f"{s['precision']}: {s['keys']} keys measured; first step {s['first_step_s']:.1f} s, then {s['step_s']:.2f} s per step")
    path = common.RESULTS / f"routes_{args.model}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
