"""Training throughput (images/s of forward + backward + Adam + EMA) of the same U-Net in three codebases.

    python benchmarks/train_throughput.py --model unet_cifar10 --batch 16 --precision fp32 bf16

Ours, diffusers' UNet2DModel (identical architecture) and denoising-diffusion-pytorch's Unet (nearest
size) each run their own idiomatic training step (ours with the fused Adam of conf/module/diffusion.yaml, the
peers with foreach Adam, faster than their default for-loop Adam on CPU; `--ours-adam foreach` puts ours on
the peers' optimiser), alternating A/B/C for `--rounds` rounds; the table
gives medians and the ratio ours / peer. Peak memory (--memory, Linux) is the resident-set peak of building the model and two training steps,
in a fresh process per row, above that process's size after its imports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

OURS_ADAM = "fused"
# ours: channels_last, as configured, routes as measured (ddpm_lightning.cpu.autotune); ours_stock: the same with
# PyTorch's operators everywhere (conf kernels=off), to show what the CPU kernels add
IMPLS = ("ours", "ours_stock", "ours_nchw", "diffusers", "denoising_diffusion_pytorch")


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Run:
    """One implementation's training step on the batch tensor `x0` (refill it in place for new data), and
    DDIM-50 sampling from its EMA weights, each in its own codebase's idiomatic way."""

    def __init__(self, impl: str, model: str, x0: torch.Tensor, precision: str = "fp32", arch: dict | None = None):
        torch.manual_seed(0)
        self.impl, self.x0, self.precision = impl, x0, precision
        channels, image_size, device = x0.shape[1], x0.shape[-1], x0.device
        build = {"diffusers": common.diffusers_unet, "denoising_diffusion_pytorch": common.lucidrains_unet}.get(impl, common.ours)
        self.net = build(model, image_size, channels, arch).to(device)
        if impl.startswith("ours"):
            from ddpm_lightning.training.callbacks import EMA
            from ddpm_lightning.diffusion.denoiser import Denoiser
            from ddpm_lightning.diffusion.schedules import linear

            if impl != "ours_nchw":  # conf/module/diffusion.yaml channels_last: true; ours_nchw is the contiguous layout
                self.net = self.net.to(memory_format=torch.channels_last)
            self.denoiser = Denoiser(self.net, linear().to(device))
            self.ema, self.params = EMA(decay=0.9999, warmup=True), list(self.net.parameters())
            self.shadow, self.n = [p.detach().clone() for p in self.params], torch.zeros((), device=device)
            # fused as in conf/module/diffusion.yaml; --ours-adam foreach for the peers' update
            self.opt = torch.optim.Adam(self.params, lr=1e-3 if arch else 2e-4, **{OURS_ADAM: True})
        elif impl == "diffusers":
            from diffusers import DDPMScheduler
            from diffusers.training_utils import EMAModel

            self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
            self.ema = EMAModel(self.net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)  # examples/unconditional_image_generation defaults
            self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3 if arch else 2e-4, foreach=True)
        elif impl == "denoising_diffusion_pytorch":
            from denoising_diffusion_pytorch import GaussianDiffusion
            from ema_pytorch import EMA as LucidEMA

            self.diffusion = GaussianDiffusion(self.net, image_size=image_size, timesteps=1000, objective="pred_noise", beta_schedule="linear").to(device)
            self.ema = LucidEMA(self.diffusion, beta=0.9999, update_every=1, update_after_step=0)
            self.opt = torch.optim.Adam(self.diffusion.parameters(), lr=1e-3 if arch else 2e-4, foreach=True)
        else:
            raise ValueError(f"unknown implementation {impl!r}")

    def loss(self) -> torch.Tensor:
        x0 = self.x0
        if self.impl.startswith("ours"):
            from ddpm_lightning.diffusion.losses import eps_mse

            if self.impl != "ours_nchw":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            return eps_mse(self.denoiser, x0)[0].mean()
        if self.impl == "diffusers":
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (len(x0),), device=x0.device)
            return F.mse_loss(self.net(self.scheduler.add_noise(x0, noise, t), t).sample.float(), noise)
        return self.diffusion((x0 + 1) / 2)  # it takes images in [0, 1]

    def step(self) -> None:
        from ddpm_lightning.cpu import autotune as routes

        stock = routes.forcing(conv3x3="onednn", group_norm="stock") if self.impl == "ours_stock" else contextlib.nullcontext()
        with stock:
            with autocast(self.precision):
                loss = self.loss()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.impl.startswith("ours"):
            self.ema._ema_update(self.shadow, [p.detach() for p in self.params], self.n)
            self.n += 1
        elif self.impl == "diffusers":
            self.ema.step(self.net.parameters())
        else:
            self.ema.update()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images in [-1, 1] by DDIM with 50 steps (eta 0) from the EMA weights, the x_0 prediction clipped to
        [-1, 1] at every step in all three (diffusers' DDIMScheduler clip_sample and denoising-diffusion-pytorch's
        ddim_sample do so by default; ours with clip_denoised=True)."""
        shape = (n, *self.x0.shape[1:])
        if self.impl.startswith("ours"):
            from ddpm_lightning.diffusion.denoiser import Denoiser
            from ddpm_lightning.diffusion.samplers import PerSampleNoise, ddim

            net = copy.deepcopy(self.net).eval()
            for p, s in zip(net.parameters(), self.shadow):
                p.copy_(s)
            noise = PerSampleNoise(range(n), self.x0.device)
            return ddim(Denoiser(net, self.denoiser.schedule), noise.randn(shape[1:]), noise, steps=50, clip_denoised=True).clamp(-1, 1)
        if self.impl == "diffusers":
            from diffusers import DDIMPipeline, DDIMScheduler

            net = copy.deepcopy(self.net).eval()
            self.ema.copy_to(net.parameters())
            pipe = DDIMPipeline(unet=net, scheduler=DDIMScheduler(num_train_timesteps=1000))
            pipe.set_progress_bar_config(disable=True)
            out = pipe(batch_size=n, num_inference_steps=50, eta=0.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
            return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1
        model = self.ema.ema_model.eval()
        model.sampling_timesteps, model.is_ddim_sampling = 50, True
        return model.sample(batch_size=n) * 2 - 1


def _status_kb(key: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in kB."""
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))


def batch_of(args, device) -> torch.Tensor:
    return torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device, generator=torch.Generator(device).manual_seed(0)) * 2 - 1


def peak_memory_mb(impl: str, args) -> float:
    """Peak resident memory of 2 training steps in a fresh process, above the same process before building."""
    cmd = [sys.executable, __file__, "--memory-of", impl, "--model", args.model, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--channels", str(args.channels), "--precision", args.precision[0]] + ["--default-malloc"] * args.default_malloc
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--arch", type=json.loads, default=None, help='U-Net settings over the model config, as JSON, e.g. \'{"ch_mult": [1, 2, 4]}\'')
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one process per row)")
    p.add_argument("--ours-adam", default="fused", choices=["foreach", "fused"])
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    common.allocator_option(p)
    args = p.parse_args()
    common.set_allocator(args)
    common.prepare_routes()
    global OURS_ADAM
    OURS_ADAM = args.ours_adam
    device = common.device()
    if args.memory_of:
        import ddpm_lightning.training.callbacks  # noqa: F401  (imports are not the model's memory)
        import diffusers.training_utils  # noqa: F401
        import ema_pytorch  # noqa: F401
        import denoising_diffusion_pytorch  # noqa: F401

        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
        run = Run(args.memory_of, args.model, batch_of(args, device), args.precision[0])
        run.step(), run.step()
        print((_status_kb("VmHWM") - base) / 1024)
        return
    rows = []
    for precision in args.precision:
        steps, params = {}, {}
        for impl in args.impls:
            run = Run(impl, args.model, batch_of(args, device), precision, args.arch)
            run.step()  # warm-up: allocator, autocast caches, lazy inits
            steps[impl], params[impl] = run.step, common.count(run.net)
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
    print(f"{args.model} {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps, ours with {args.ours_adam} Adam")
    common.report(f"train_throughput_{args.model}" + (f"_{args.tag}" if args.tag else ""), rows, ["precision", "impl", "params", "images_per_s", "ours_over_this", "peak_mem_mb"])


if __name__ == "__main__":
    main()
