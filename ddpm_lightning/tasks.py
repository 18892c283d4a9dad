"""Entry points called by train.py (and directly by tests): plain functions of a Hydra config."""

from __future__ import annotations

import ctypes
import logging
import platform
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.benign_warnings import filter_benign_messages
from ddpm_lightning.checkpointing import resume_checkpoint
from ddpm_lightning.compose import fit_model_to_data
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.summary import cli_overrides, train_summary

log = logging.getLogger(__name__)


def _read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check ckpt_path)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "net" not in (ckpt.get("hyper_parameters") or {}):
        raise ValueError(f"{path} is not a ddpm-lightning checkpoint (no hyper_parameters.net)")
    return ckpt


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    """Keys at which two nested config dicts differ, as 'key: a != b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix}: checkpoint has {a!r}, config has {b!r}"]


_KERNEL_SWITCHES = ("fused_norm", "winograd")  # UNet options that choose how it computes, not what


def check_resumable(ckpt_path: str | Path, module: DiffusionModule) -> None:
    """Refuse to resume from a checkpoint of another model, before any compute is spent."""
    hp = _read_checkpoint(ckpt_path)["hyper_parameters"]
    diffs = []
    for key, cfg_key in (("net", "model"), ("schedule", "schedule"), ("image_size", "data.image_size"), ("channels", "data.channels"), ("parameterization", "module.parameterization")):
        a, b = hp.get(key), module.hparams.get(key)
        if key == "net":
            a, b = ({k: v for k, v in (d or {}).items() if k not in _KERNEL_SWITCHES} for d in (a, b))
        diffs += _diff(a, b, cfg_key)
    if diffs:
        raise ValueError(
            f"ckpt_path={ckpt_path} was trained with another model; these config keys differ:\n  "
            + "\n  ".join(diffs)
            + "\nSet them as in the checkpoint (see its run's config.yaml) or start without ckpt_path."
        )


def load_model(ckpt_path: str | Path, use_ema: bool = True, map_location: Any = "cpu") -> DiffusionModule:
    """Rebuild a trained model from a checkpoint alone, in eval mode, with the EMA weights by default."""
    ckpt = _read_checkpoint(ckpt_path, map_location)
    module = DiffusionModule(**ckpt["hyper_parameters"])
    has_ema = "current_model_state" in ckpt
    if use_ema and not has_ema:
        warnings.warn(f"{ckpt_path} holds no EMA weights; loading the raw weights", stacklevel=2)
    state = ckpt["state_dict"] if use_ema or not has_ema else ckpt["current_model_state"]
    module.load_state_dict(state)
    module.global_step_loaded = ckpt.get("global_step", 0)
    return module.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the OS.

    Its defaults serve blocks above a (self-adjusting) threshold with fresh `mmap`s and trim the heap top when
    it is freed, so a training step that frees and re-allocates the same activation buffers page-faults them
    all in again (about 40,000 faults and 0.2 s of kernel time per unet_cifar10 bf16 step at batch 16 on a
    2-core CPU, 20% of the step). With both thresholds raised, the process keeps its peak heap and reuses it.
    Returns False (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising a config error (ValueError) as itself rather than wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiate calls wrap once per level
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from `cfg` and fit. Returns the final metrics."""
    filter_benign_messages()
    fit_model_to_data(cfg)
    OmegaConf.resolve(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()

    datamodule = build(cfg.data)
    module: DiffusionModule = build(cfg.module)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:  # a requeued or restarted job: continue from the run directory's own checkpoint
        dirs = [c.dirpath for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint) and c.dirpath]
        found = resume_checkpoint(cfg.trainer.get("default_root_dir") or out, dirs)
        if found is not None:
            log.info("Resuming from %s (found in the run directory)", found)
            ckpt_path = str(found)
    if ckpt_path and ckpt_path not in ("last", "hpc"):
        check_resumable(ckpt_path, module)
    if not loggers:  # nothing to log the learning rate to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log.info("Run directory: %s", out)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if trainer.is_global_zero:
        print(train_summary(trainer, out, metrics, cli_overrides()), flush=True)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample a checkpoint and compute FID / IS / KID (see ddpm_lightning.evaluation)."""
    from ddpm_lightning.evaluation import evaluate as run

    filter_benign_messages()
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()
    return run(cfg)
