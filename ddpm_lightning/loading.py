"""Every model read from a checkpoint: a diffusion model (`load_model`), a noise-aware classifier for classifier
guidance (`load_classifier`, `classifier_guidance`), a ControlNet's base (`read_base`). Files are read by
`checkpointing.read_checkpoint` (weights_only, stored configs checked) and models built through the registry's
checks (`build_module`); several ControlNets over one base (`load_controlnets`); diffusers folders are `ddpm_lightning.interop.diffusers`."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm_lightning import registry
from ddpm_lightning.checkpointing import file_sha256, read_checkpoint
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.guidance import ClassifierGuidance
from ddpm_lightning.nets.controlnet import ControlledUNet, MultiControlledUNet
from ddpm_lightning.training.classifier_module import NoisyClassifierModule
from ddpm_lightning.training.module import DiffusionModule


def build_module(constructor: Any, ckpt: dict, path: str | Path, key: str, state: dict | None = None) -> Any:
    """A LightningModule rebuilt from a checkpoint read by `read_checkpoint`: its hyper-parameters checked against
    `constructor` (`registry.check_module`), then built and given `state` (default: the checkpoint's state_dict).
    A failure inside construction or loading (settings that do not fit the weights, values out of range) is a
    ValueError naming the file."""
    source = f"checkpoint {path} ({key})"
    hp = ckpt["hyper_parameters"]
    registry.check_module(constructor, hp, source)
    try:
        module = constructor(**hp)
        module.load_state_dict(ckpt["state_dict"] if state is None else state)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError, ZeroDivisionError, AttributeError) as e:
        raise ValueError(f"{source}: its hyper_parameters do not build the model its weights belong to ({type(e).__name__}: {e})") from None
    return module


def load_model(ckpt_path: str | Path, use_ema: bool = True, map_location: Any = "cpu"):
    """Rebuild a trained DiffusionModule from a checkpoint alone, in eval mode, with the EMA weights by default."""
    ckpt = read_checkpoint(ckpt_path, map_location)
    has_ema = "current_model_state" in ckpt
    if use_ema and not has_ema:
        warnings.warn(f"{ckpt_path} holds no EMA weights; loading the raw weights", stacklevel=2)
    state = ckpt["state_dict"] if use_ema or not has_ema else ckpt["current_model_state"]
    module = build_module(DiffusionModule, ckpt, ckpt_path, "ckpt_path", state)
    module.global_step_loaded = ckpt.get("global_step", 0)
    return module.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def load_classifier(path: str | Path, schedule: nn.Module | None = None) -> nn.Module:
    """The EMA-weighted network of a noise-aware classifier checkpoint, in eval mode and frozen."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path} (check guidance.classifier)")
    net = _load_classifier(str(path.resolve()), path.stat().st_mtime_ns)
    if schedule is not None and hasattr(schedule, "T") and hasattr(net, "trained_schedule"):
        if not _same_schedule(net.trained_schedule, schedule):
            raise ValueError(f"{path} was trained with another noise schedule than the diffusion model (set schedule.* alike)")
    return net


def _same_schedule(a: nn.Module, b: nn.Module) -> bool:
    if getattr(a, "T", None) != b.T:
        return False
    alpha = [s.alpha(torch.arange(b.T, device=next(s.buffers()).device)).cpu() for s in (a, b)]
    return torch.allclose(*alpha, atol=1e-6)


@functools.lru_cache(maxsize=4)
def _load_classifier(path: str, mtime_ns: int) -> nn.Module:
    ckpt = read_checkpoint(path, key="guidance.classifier")
    hp = ckpt["hyper_parameters"]
    if "sampler" in hp or "optimizer" not in hp:
        raise ValueError(f"{path} is a diffusion model checkpoint, not a classifier (train one with experiment=classifier_digits)")
    module = build_module(NoisyClassifierModule, ckpt, path, "guidance.classifier")  # the EMA weights when an EMA callback ran
    net = module.net.eval().requires_grad_(False)
    net.trained_schedule = module.schedule
    return net


def classifier_guidance(denoiser: Denoiser, classifier: str | Path | nn.Module, scale: float = 1.0, conditional: bool | None = None) -> ClassifierGuidance:
    """ClassifierGuidance (conf/guidance/classifier.yaml) with `classifier` a checkpoint path (`guidance.classifier`),
    loaded with the diffusion model's schedule checked, or a network."""
    if isinstance(classifier, (str, Path)):
        classifier = load_classifier(classifier, denoiser.schedule)
    return ClassifierGuidance(denoiser, classifier, scale, conditional)


def read_base(base_ckpt: str | Path | None) -> tuple[dict, dict, str]:
    """The hyperparameters and network weights (EMA when present) of a base diffusion checkpoint, and its sha256;
    a missing, corrupt or non-diffusion checkpoint is refused naming `base_ckpt`."""
    if not base_ckpt:
        raise ValueError("a ControlNet trains on top of a trained model: set base_ckpt=<its checkpoints/last.ckpt>")
    path = Path(base_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"base_ckpt={path}: no such file (the checkpoint of the trained model to control)")
    ckpt = read_checkpoint(path, key="base_ckpt")
    hp = ckpt["hyper_parameters"]
    if "schedule" not in hp or "sampler" not in hp:
        raise ValueError(f"base_ckpt={path} is not a diffusion model checkpoint (a classifier's?)")
    registry.check_module(DiffusionModule, hp, f"checkpoint {path} (base_ckpt)")
    if hp["net"]["_target_"].endswith("ControlledUNet"):
        raise ValueError(f"base_ckpt={path} is a ControlNet checkpoint; give the checkpoint of the model it controls")
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    return hp, state, file_sha256(path)


def load_controlnets(ckpt_paths: list[str | Path], scales: Any = 1.0, use_ema: bool = True, map_location: Any = "cpu") -> DiffusionModule:
    """Several ControlNet checkpoints over one base (Zhang et al. 2023 Sec. 3.5) as one model: the first
    checkpoint's DiffusionModule (schedule, sampler, hyper-parameters) whose network is a `MultiControlledUNet`
    holding the base once and every checkpoint's control branch, summed with `scales` (one per checkpoint, or one
    number for all). `model.sample(seeds, hint=[h_1, ..., h_N], conditioning_scale=[...])` samples under all the
    conditions. Checkpoints that are not ControlNets, or whose recorded base_sha256 differ, are refused naming them."""
    modules = [load_model(p, use_ema=use_ema, map_location=map_location) for p in ckpt_paths]
    return combine_controlnets(modules, [str(p) for p in ckpt_paths], scales)


def combine_controlnets(modules: list[DiffusionModule], names: list[str], scales: Any = 1.0) -> DiffusionModule:
    """`load_controlnets` on models already loaded (`names`: their files, for the errors)."""
    if len(modules) < 1 or len(modules) != len(names):
        raise ValueError("load_controlnets: give at least one ControlNet checkpoint")
    for module, name in zip(modules, names):
        if not isinstance(module.net, ControlledUNet):
            raise ValueError(f"{name} is not a ControlNet checkpoint (trained with experiment=controlnet_*); only "
                             "ControlNets over the same base combine")
    digests = {name: module.net.base_sha256 for module, name in zip(modules, names)}
    if len(set(digests.values())) != 1 or None in digests.values():
        listed = ", ".join(f"{n} (base_sha256 {str(d)[:12]})" for n, d in digests.items())
        raise ValueError(f"these ControlNets were trained on different base checkpoints and cannot be summed over one "
                         f"base: {listed}")
    host = modules[0]
    net = MultiControlledUNet(host.net.base, [m.net.control for m in modules], [m.net.condition for m in modules],
                              scales, host.net.base_sha256)
    host.net = net.to(host.device)
    host.denoiser = Denoiser(net, host.schedule, host.denoiser.parameterization, host.denoiser.learn_sigma)
    host.controlnet_paths = list(names)
    return host.eval()
