"""3x3 convolutions (stride 1, padding 1) on the U-Net's shapes, channels-last: oneDNN's direct convolution
(F.conv2d) against Winograd of ddpm_lightning.cpu.conv, forward alone and forward + backward; in fp32 F(4x4, 3x3),
in bf16 (bf16 input and operands, as under autocast) F(2x2, 3x3) with bf16 matrix products.

    python benchmarks/conv.py --batch 16 [--precision bf16]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from ddpm_lightning.cpu import autotune as routes  # noqa: E402
from ddpm_lightning.cpu import conv  # noqa: E402

SHAPES = [(128, 128, 32), (256, 128, 32), (256, 256, 16), (512, 256, 16), (256, 256, 8), (256, 256, 4)]  # (in, out, side) of unet_cifar10


def ms(fn, n: int) -> float:
    """Milliseconds of one call, the median of n after two warm-up calls."""
    times = []
    for _ in range(n + 2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return common.median(times[2:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    if routes.kernel("winograd", wait=True) is None:
        sys.exit("the Winograd kernel could not be built here")
    rows = []
    cl = torch.channels_last
    for i, o, side in SHAPES:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        x = torch.randn(args.batch, i, side, side, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
        w = (torch.randn(o, i, 3, 3, dtype=dtype) / (3 * i**0.5)).contiguous(memory_format=cl).requires_grad_()
        b = torch.randn(o, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.batch, o, side, side, dtype=dtype).contiguous(memory_format=cl)
        winograd = (lambda x, w, b: conv.winograd_conv3x3(x, w, b, 2, dtype)) if args.precision == "bf16" else conv.winograd_conv3x3
        impls = {"direct": lambda x, w, b: F.conv2d(x, w, b, 1, 1), "winograd": winograd}
        row = {"shape": f"{args.batch}x{i}x{side}x{side} -> {o}"}
        for name, f in impls.items():
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = ms(lambda: f(x, w, b), args.repeats)
            row[f"{name}_fwd_bwd_ms"] = ms(lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy), args.repeats)
        row["fwd_speedup"] = row["direct_fwd_ms"] / row["winograd_fwd_ms"]
        row["fwd_bwd_speedup"] = row["direct_fwd_bwd_ms"] / row["winograd_fwd_bwd_ms"]
        rows.append(row)
    print(f"3x3 convolution, {args.precision} channels-last, {torch.get_num_threads()} threads, median of {args.repeats}")
    common.report("conv" if args.precision == "fp32" else f"conv_{args.precision}", rows, ["shape", "direct_fwd_ms", "winograd_fwd_ms", "fwd_speedup", "direct_fwd_bwd_ms", "winograd_fwd_bwd_ms", "fwd_bwd_speedup"])


if __name__ == "__main__":
    main()
