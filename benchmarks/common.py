"""Shared pieces of the benchmarks: the three implementations of the same U-Net, timing, and reports.

Peers (installed with `pip install -e ".[bench]"`): huggingface diffusers' `UNet2DModel` in the
configuration of `google/ddpm-cifar10-32` (Ho et al.'s CIFAR-10 U-Net, 35,746,307 parameters, the same
count as ours) and denoising-diffusion-pytorch's `Unet` at the width whose parameter count is nearest.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
RESULTS = Path(__file__).resolve().parent / "results"
_ALLOCATOR = {"retain_freed_memory": False}


def allocator_option(p) -> None:
    p.add_argument("--default-malloc", action="store_true", help="glibc's default malloc settings, not retain_freed_memory")


def set_allocator(args) -> None:
    """Every implementation of a benchmark runs in one process with the allocator setting train.py and
    evaluate.py use (conf retain_freed_memory: true), so the peers gain from it as much as ours."""
    if not args.default_malloc:
        from ddpm_lightning.cpu import retain_freed_memory

        _ALLOCATOR["retain_freed_memory"] = retain_freed_memory()


def ours_config(model: str, arch: dict | None = None) -> dict:
    """The U-Net settings of conf/model/<model>.yaml, with `arch` overriding some of them."""
    return {**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{model}.yaml")), **(arch or {})}


def ours(model: str, image_size: int, channels: int, arch: dict | None = None) -> torch.nn.Module:
    """Our U-Net from its config file, e.g. conf/model/unet_cifar10.yaml, with the CPU speed plug-in's modules
    swapped in (ddpm_lightning.cpu, as a run with kernels=auto trains it)."""
    from ddpm_lightning import cpu

    return cpu.accelerate(instantiate({**ours_config(model, arch), "in_channels": channels, "image_size": image_size}))


def diffusers_unet(model: str, image_size: int, channels: int, arch: dict | None = None) -> torch.nn.Module:
    """diffusers' UNet2DModel with our U-Net's architecture (for unet_cifar10: google/ddpm-cifar10-32's config)."""
    from diffusers import UNet2DModel

    cfg = ours_config(model, arch)
    widths = tuple(cfg["ch"] * m for m in cfg["ch_mult"])
    attn = [image_size // 2**i in cfg["attn_resolutions"] for i in range(len(widths))]
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=widths,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=cfg["num_res_blocks"], flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        norm_eps=1e-6, attention_head_dim=None, dropout=cfg.get("dropout", 0.0),
    )


def lucidrains_unet(model: str, image_size: int, channels: int, arch: dict | None = None) -> torch.nn.Module:
    """denoising-diffusion-pytorch's Unet with our channel multipliers, at the width (multiple of 8) whose
    parameter count is nearest to ours."""
    from denoising_diffusion_pytorch import Unet

    cfg = ours_config(model, arch)
    target = count(ours(model, image_size, channels, arch))
    best = min(range(8, 4 * cfg["ch"] + 1, 8), key=lambda d: abs(count(Unet(dim=d, dim_mults=tuple(cfg["ch_mult"]), channels=channels)) - target))
    return Unet(dim=best, dim_mults=tuple(cfg["ch_mult"]), channels=channels, dropout=cfg.get("dropout", 0.0))


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def alternate(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each run once per round, in turn (A, B, C, A, B, C, ...), so drifts in machine load hit all alike.
    Each run returns a throughput; the lists of all rounds come back."""
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            out[name].append(run())
    return out


def timed(fn: Callable[[], None], n: int) -> float:
    """Seconds per call of fn over n calls (after the caller's warm-up)."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def device() -> str:
    """The device benchmarks run on: the GPU where there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_routes() -> None:
    """Build the CPU kernels before timing (not in the background, as a first training run does), so that
    the routes are measured with every candidate; the route decisions then land in the report."""
    from ddpm_lightning.cpu import autotune

    autotune.configure(wait=True)
    torch.backends.cudnn.benchmark = True  # as train.py and evaluate.py set it (conf cudnn_benchmark)


def sync() -> None:
    """Wait for the GPU's queued work, so that a timer sees it done (nothing on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine(run: DictConfig | None = None) -> dict:
    """The machine and the process's speed settings; with `run`, a config that `tasks.train` ran, its `kernels` and
    `retain_freed_memory` (the plug-in's process defaults are not what such a run used)."""
    from ddpm_lightning.cpu import autotune

    cpu = autotune.machine()
    speed = {"kernels": autotune.mode(), **_ALLOCATOR} if run is None else {
        "kernels": run.get("kernels") or "off", "retain_freed_memory": bool(run.get("retain_freed_memory"))}
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu["cpu"],
        "cpu": cpu["cpu"],
        "cpu_flags": cpu["flags"],  # of amx_bf16, amx_tile, avx512_bf16, avx512f, avx512_fp16, avx2, fma
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),  # benchmarks/README.md names it for every result
        "amx": getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "routes": autotune.decisions(),  # (layer, input) -> the route it took, measured or from the route cache
        **speed,
    }


def report(name: str, rows: list[dict], columns: list[str]) -> None:
    """Print a table and write benchmarks/results/<name>.json."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config as `python train.py <overrides> paths.output_dir=<output_dir>` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
