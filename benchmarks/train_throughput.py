"""Training throughput (images/s of forward + backward + Adam + EMA) of the same U-Net in three codebases.

    python benchmarks/train_throughput.py --model unet_cifar10 --batch 16 --precision fp32 bf16

Ours, diffusers' UNet2DModel (identical architecture) and denoising-diffusion-pytorch's Unet (nearest
size) each run their own idiomatic training step, alternating A/B/C for `--rounds` rounds; the table
gives medians and the ratio ours / peer. Peak memory is measured in a fresh process per row.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

IMPLS = ("ours", "ours_channels_last", "diffusers", "denoising_diffusion_pytorch")


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_fn(impl: str, model: str, image_size: int, channels: int, batch: int, precision: str, device: str):
    """A closure running one training step of `impl`."""
    torch.manual_seed(0)
    x0 = torch.rand(batch, channels, image_size, image_size, device=device) * 2 - 1
    if impl.startswith("ours"):
        from ddpm_lightning.callbacks import EMA
        from ddpm_lightning.denoiser import Denoiser
        from ddpm_lightning.losses import eps_mse
        from ddpm_lightning.schedules import linear

        net = common.ours(model, image_size, channels).to(device)
        if impl == "ours_channels_last":
            net = net.to(memory_format=torch.channels_last)
            x0 = x0.contiguous(memory_format=torch.channels_last)
        denoiser = Denoiser(net, linear().to(device))
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)
        ema, params = EMA(decay=0.9999), list(net.parameters())
        shadow, n = [p.detach().clone() for p in params], torch.zeros((), device=device)

        def step():
            with autocast(precision):
                loss = eps_mse(denoiser, x0)[0].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema._ema_update(shadow, [p.detach() for p in params], n)

        return step, net
    if impl == "diffusers":
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        net = common.diffusers_unet(model, image_size, channels).to(device)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)
        ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)

        def step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,), device=device)
            with autocast(precision):
                pred = net(scheduler.add_noise(x0, noise, t), t).sample
                loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(net.parameters())

        return step, net
    if impl == "denoising_diffusion_pytorch":
        from denoising_diffusion_pytorch import GaussianDiffusion
        from ema_pytorch import EMA as LucidEMA

        net = common.lucidrains_unet(model, image_size, channels)
        diffusion = GaussianDiffusion(net, image_size=image_size, timesteps=1000, objective="pred_noise").to(device)
        opt = torch.optim.Adam(diffusion.parameters(), lr=2e-4, foreach=True)
        ema = LucidEMA(diffusion, beta=0.9999, update_every=1, update_after_step=0)
        x01 = (x0 + 1) / 2  # it takes images in [0, 1]

        def step():
            with autocast(precision):
                loss = diffusion(x01)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update()

        return step, net
    raise ValueError(f"unknown implementation {impl!r}")


def peak_memory_mb(impl: str, args) -> float:
    """Peak resident memory of 2 training steps in a fresh process, above the same process before building."""
    cmd = [sys.executable, __file__, "--memory-of", impl, "--model", args.model, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--channels", str(args.channels), "--precision", args.precision[0]]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one process per row)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_of:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step, _ = step_fn(args.memory_of, args.model, args.image_size, args.channels, args.batch, args.precision[0], device)
        step(), step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        return
    rows = []
    for precision in args.precision:
        steps, params = {}, {}
        for impl in args.impls:
            step, net = step_fn(impl, args.model, args.image_size, args.channels, args.batch, precision, device)
            step()  # warm-up: allocator, autocast caches, lazy inits
            steps[impl], params[impl] = step, common.count(net)
        results = common.alternate({k: (lambda s=s: args.batch / common.timed(s, args.steps)) for k, s in steps.items()}, args.rounds)
        base = common.median(results["ours"]) if "ours" in results else None
        for impl in args.impls:
            row = {"precision": precision, "impl": impl, "params": params[impl], "images_per_s": common.median(results[impl])}
            if base is not None:
                row["ours_over_this"] = base / row["images_per_s"]
            if args.memory:
                args_p = argparse.Namespace(**{**vars(args), "precision": [precision]})
                row["peak_mem_mb"] = peak_memory_mb(impl, args_p)
            rows.append(row)
    print(f"{args.model} {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    common.report(f"train_throughput_{args.model}", rows, ["precision", "impl", "params", "images_per_s", "ours_over_this", "peak_mem_mb"])


if __name__ == "__main__":
    main()
