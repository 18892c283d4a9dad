"""Sampling throughput (images/s) of DDPM-1000 and DDIM-50: ours against the diffusers pipelines, same U-Net.

    python benchmarks/sample_throughput.py --model unet_cifar10 --batch 8 --timed-steps 20

Each run times `--timed-steps` network evaluations of the sampler's loop (a forward hook stops the loop
there) and reports images/s for the whole chain, extrapolated linearly over its steps; the two loops are
timed alternately for `--rounds` rounds. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402


class Stop(Exception):
    pass


def stop_after(net: torch.nn.Module, n: int):
    """A forward hook that ends the sampling loop after n network calls."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] >= n:
            raise Stop

    return net.register_forward_hook(hook)


def time_loop(net: torch.nn.Module, loop, n: int) -> float:
    """Seconds per step of `loop()` over its first n network calls."""
    handle = stop_after(net, n)
    common.sync()
    start = time.perf_counter()
    try:
        loop()
    except Stop:
        pass
    finally:
        handle.remove()
    common.sync()
    return (time.perf_counter() - start) / n


def ours_loop(net, sampler: str, batch: int, shape, device):
    from ddpm_lightning.denoiser import Denoiser
    from ddpm_lightning.samplers import PerSampleNoise, ddim, ddpm
    from ddpm_lightning.schedules import linear

    denoiser = Denoiser(net, linear().to(device))

    def loop():
        noise = PerSampleNoise(range(batch), device)
        x = noise.randn(shape)
        if sampler == "ddpm":
            ddpm(denoiser, x, noise)
        else:
            ddim(denoiser, x, noise, steps=50)

    return loop


def diffusers_loop(net, sampler: str, batch: int, shape, device):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if sampler == "ddpm":
        pipe = DDPMPipeline(unet=net, scheduler=DDPMScheduler(num_train_timesteps=1000))
        kwargs = {"num_inference_steps": 1000}
    else:
        pipe = DDIMPipeline(unet=net, scheduler=DDIMScheduler(num_train_timesteps=1000))
        kwargs = {"num_inference_steps": 50, "eta": 0.0}
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0), output_type="np", **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--timed-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    common.prepare_routes()
    device = common.device()
    shape = (args.channels, args.image_size, args.image_size)
    nets = {
        "ours": common.ours(args.model, args.image_size, args.channels).to(device, memory_format=torch.channels_last).eval(),
        "ours_nchw": common.ours(args.model, args.image_size, args.channels).to(device).eval(),
        "diffusers": common.diffusers_unet(args.model, args.image_size, args.channels).to(device).eval(),
    }
    build = {"ours": ours_loop, "ours_nchw": ours_loop, "diffusers": diffusers_loop}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    rows = []
    for sampler, chain in (("ddpm", 1000), ("ddim", 50)):
        loops = {k: build[k](nets[k], sampler, args.batch, shape, device) for k in nets}
        n = min(args.timed_steps, chain)

        def run(k):
            with torch.no_grad(), autocast:
                return args.batch / (time_loop(nets[k], loops[k], n) * chain)

        for k in nets:  # warm-up
            run(k)
        results = common.alternate({k: (lambda k=k: run(k)) for k in nets}, args.rounds)
        for k in nets:
            rows.append({"sampler": f"{sampler}-{chain}", "impl": k, "images_per_s": common.median(results[k]),
                         "ours_over_this": common.median(results["ours"]) / common.median(results[k])})
    print(f"{args.model} {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {device}, {args.precision}, {torch.get_num_threads()} threads")
    common.report(f"sample_throughput_{args.model}_{args.precision}", rows, ["sampler", "impl", "images_per_s", "ours_over_this"])


if __name__ == "__main__":
    main()
