"""GroupNorm + SiLU, forward and backward, on the U-Net's activation shapes: F.group_norm on NCHW and on
channels-last tensors against the fused channels-last kernel of ddpm_lightning.cpu.norm.

    python benchmarks/group_norm.py --batch 16 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from ddpm_lightning.cpu import autotune as routes  # noqa: E402
from ddpm_lightning.cpu import norm  # noqa: E402

SHAPES = [(128, 32), (256, 32), (256, 16), (512, 16), (256, 8), (256, 4)]  # (channels, side) of unet_cifar10


def step_ms(layer, x: torch.Tensor, dy: torch.Tensor, n: int) -> float:
    """Milliseconds of one forward + backward, the median of n."""
    times = []
    for _ in range(n + 2):
        x.grad = None
        t = time.perf_counter()
        layer(x).backward(dy)
        times.append(time.perf_counter() - t)
    return common.median(times[2:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=20)
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    if routes.kernel(wait=True) is None:
        sys.exit("the fused kernel could not be built here")
    rows = []
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for channels, side in SHAPES:
            x = torch.randn(args.batch, channels, side, side).to(dtype)
            dy = torch.randn_like(x)
            layer = norm.GroupNorm(32, channels, silu=True)
            cl = {"memory_format": torch.channels_last}
            with routes.forcing(group_norm="stock"):
                ms = {
                    "nchw": step_ms(layer, x.clone().requires_grad_(), dy, args.repeats),
                    "channels_last": step_ms(layer, x.contiguous(**cl).requires_grad_(), dy.contiguous(**cl), args.repeats),
                }
            with routes.forcing(group_norm="fused"):
                ms["fused"] = step_ms(layer, x.contiguous(**cl).requires_grad_(), dy.contiguous(**cl), args.repeats)
            rows.append({"precision": precision, "shape": f"{args.batch}x{channels}x{side}x{side}",
                         "nchw_ms": ms["nchw"], "channels_last_ms": ms["channels_last"], "fused_ms": ms["fused"],
                         "channels_last_over_fused": ms["channels_last"] / ms["fused"]})
    print(f"GroupNorm(32) + SiLU forward + backward, {torch.get_num_threads()} threads, median of {args.repeats}")
    common.report("group_norm", rows, ["precision", "shape", "nchw_ms", "channels_last_ms", "fused_ms", "channels_last_over_fused"])


if __name__ == "__main__":
    main()
