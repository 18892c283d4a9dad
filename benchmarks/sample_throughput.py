"""Sampling throughput (images/s) of DDPM-1000 and DDIM-50: ours against the diffusers pipelines, same U-Net.

    python benchmarks/sample_throughput.py --model unet_cifar10 --batch 8 --timed-steps 20
    python benchmarks/sample_throughput.py --samplers ddim:50 dpmpp_2m:20 heun:10 euler_ancestral:50 --tag fewstep

Each run times `--timed-steps` network evaluations of the sampler's loop (a forward hook stops the loop
there) and reports images/s for the whole chain, extrapolated linearly over its network evaluations; the
loops are timed alternately for `--rounds` rounds. Weights are random: speed does not depend on them.
`--samplers` takes name:steps of conf/sampler/<name>.yaml; diffusers runs ddpm, ddim and dpmpp_2m (its
DPMSolverMultistepScheduler, DPM-Solver++ order 2, in the DDPM pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
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


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of a chain: 1000 for ddpm, 2 steps - 1 for heun, else steps."""
    return {"ddpm": 1000, "heun": 2 * steps - 1}.get(sampler, steps)


def ours_loop(net, sampler: str, steps: int, batch: int, shape, device):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ddpm_lightning.diffusion.denoiser import Denoiser
    from ddpm_lightning.diffusion.samplers import PerSampleNoise
    from ddpm_lightning.diffusion.schedules import linear

    denoiser = Denoiser(net, linear().to(device))
    cfg = OmegaConf.load(common.CONF / "sampler" / f"{sampler}.yaml")
    if "steps" in cfg:
        cfg.steps = steps
    sample = instantiate(cfg)

    def loop():  # as Module.sample runs it
        noise = PerSampleNoise(range(batch), device)
        with getattr(net, "sampling_context", contextlib.nullcontext)():
            sample(denoiser, noise.randn(shape), noise)

    return loop


def diffusers_loop(net, sampler: str, steps: int, batch: int, shape, device):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddpm":
        pipe = DDPMPipeline(unet=net, scheduler=DDPMScheduler(num_train_timesteps=1000))
        kwargs = {"num_inference_steps": 1000}
    elif sampler == "ddim":
        pipe = DDIMPipeline(unet=net, scheduler=DDIMScheduler(num_train_timesteps=1000))
        kwargs = {"num_inference_steps": steps, "eta": 0.0}
    else:  # the DDPM pipeline only calls scheduler.step(eps, t, x, generator), which DPM-Solver++ takes
        pipe = DDPMPipeline(unet=net, scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
        kwargs = {"num_inference_steps": steps}
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0), output_type="np", **kwargs)


DIFFUSERS = ("ddpm", "ddim", "dpmpp_2m")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--timed-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:50"], help="name:steps of conf/sampler/<name>.yaml")
    p.add_argument("--implementations", nargs="+", default=["ours", "ours_nchw", "diffusers"])
    p.add_argument("--tag", default="", help="suffix of the results file")
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    common.prepare_routes()
    device = common.device()
    shape = (args.channels, args.image_size, args.image_size)
    make = {
        "ours": lambda: common.ours(args.model, args.image_size, args.channels).to(device, memory_format=torch.channels_last),
        "ours_nchw": lambda: common.ours(args.model, args.image_size, args.channels).to(device),
        "diffusers": lambda: common.diffusers_unet(args.model, args.image_size, args.channels).to(device),
    }
    all_nets = {k: make[k]().eval() for k in args.implementations}
    build = {"ours": ours_loop, "ours_nchw": ours_loop, "diffusers": diffusers_loop}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    rows = []
    for spec in args.samplers:
        sampler, steps = spec.split(":")[0], int(spec.split(":")[1]) if ":" in spec else 0
        chain = nfe(sampler, steps)
        nets = {k: v for k, v in all_nets.items() if k != "diffusers" or sampler in DIFFUSERS}
        loops = {k: build[k](nets[k], sampler, steps, args.batch, shape, device) for k in nets}
        n = min(args.timed_steps, chain)

        def run(k):
            with torch.no_grad(), autocast:
                return args.batch / (time_loop(nets[k], loops[k], n) * chain)

        for k in nets:  # warm-up
            run(k)
        results = common.alternate({k: (lambda k=k: run(k)) for k in nets}, args.rounds)
        for k in nets:
            rows.append({"sampler": f"{sampler}-{steps or chain}", "nfe": chain, "impl": k, "images_per_s": common.median(results[k]),
                         "ours_over_this": common.median(results[next(iter(nets))]) / common.median(results[k])})
    print(f"{args.model} {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {device}, {args.precision}, {torch.get_num_threads()} threads")
    name = f"sample_throughput_{args.model}_{args.precision}" + (f"_{args.tag}" if args.tag else "")
    common.report(name, rows, ["sampler", "nfe", "impl", "images_per_s", "ours_over_this"])


if __name__ == "__main__":
    main()
