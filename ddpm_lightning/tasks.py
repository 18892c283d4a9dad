"""Entry points called by train.py (and directly by tests): plain functions of a Hydra config."""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import registry
from ddpm_lightning.benign_warnings import filter_benign_messages
from ddpm_lightning.checkpointing import read_checkpoint
from ddpm_lightning.compose import build, fit_model_to_data, resolve_precision
from ddpm_lightning import edits
from ddpm_lightning.evaluation import evaluate as run
from ddpm_lightning.interop.diffusers import init_train_config
from ddpm_lightning.runs import (
    RunRecord,
    RunLock,
    hpc_checkpoint,
    last_checkpoint,
    resume_checkpoint,
)
from ddpm_lightning.summary import cli_overrides, train_summary
from ddpm_lightning.training.module import DiffusionModule

log = logging.getLogger(__name__)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    """Keys at which two nested config dicts differ, as 'key: a != b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix}: checkpoint has {a!r}, config has {b!r}"]


_KERNEL_SWITCHES = ("fused_norm", "winograd")  # UNet options that choose how it computes, not what


def _with_defaults(net: dict) -> dict:
    """A network config with its constructor's defaults filled in for absent keys, so that an option added after a
    checkpoint was written (its default keeping the old behaviour, e.g. model.learn_sigma) does not make that
    checkpoint look like another model."""
    entry = registry.REGISTRY.get(net.get("_target_"))
    if entry is None:
        return net
    params = inspect.signature(entry.resolve()).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **net}


def check_resumable(ckpt_path: str | Path, module: DiffusionModule, found_in: Path | None = None) -> None:
    """Refuse to resume from a checkpoint of another model, before any compute is spent. `found_in`: the run
    directory the checkpoint was found in (no ckpt_path given), for the hint."""
    hp = read_checkpoint(ckpt_path)["hyper_parameters"]
    diffs = []
    for key, cfg_key in (("net", "model"), ("schedule", "schedule"), ("image_size", "data.image_size"), ("channels", "data.channels"), ("parameterization", "module.parameterization")):
        a, b = hp.get(key), module.hparams.get(key)
        if key == "net":
            a, b = ({k: v for k, v in _with_defaults(d or {}).items() if k not in _KERNEL_SWITCHES} for d in (a, b))
        diffs += _diff(a, b, cfg_key)
    if diffs:
        if found_in is None:
            what, fix = f"ckpt_path={ckpt_path}", "start without ckpt_path"
        else:
            what = f"the run directory paths.output_dir={found_in} holds {ckpt_path}, which"
            fix = "choose another paths.output_dir for a new run"
        raise ValueError(
            f"{what} was trained with another model; these config keys differ:\n  "
            + "\n  ".join(diffs)
            + f"\nSet them as in the checkpoint (see its run's config.yaml) or {fix}."
        )


def speed_settings(cfg: DictConfig) -> None:
    """cuDNN's per-shape algorithm search (conf `cudnn_benchmark`, GPUs): chooses how, not what, the model computes."""
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", True))


def cpu_plugin(cfg: DictConfig) -> types.ModuleType | None:
    """The one switch of the CPU speed plug-in (ddpm_lightning.cpu), as conf asks: glibc's malloc keeps freed memory
    (`retain_freed_memory`), and unless `kernels` is off the plug-in is returned, its routes set up for this run,
    for the caller to `accelerate` the networks it builds. With both off nothing of it is imported."""
    kernels = cfg.get("kernels") or "off"
    if kernels == "off" and not cfg.get("retain_freed_memory"):
        return None
    from ddpm_lightning import cpu

    if cfg.get("retain_freed_memory"):
        cpu.retain_freed_memory()
    if kernels == "off":
        return None
    cpu.enable(kernels)
    return cpu


def _check_control(cfg: DictConfig) -> None:
    """A ControlNet run needs module=controlnet (experiment=controlnet_*), control=... and base_ckpt=... together."""
    controlnet = str(cfg.module.get("_target_", "")).endswith("ControlNetModule")
    if (cfg.get("control") or cfg.get("base_ckpt")) and not controlnet:
        raise ValueError("control=... and base_ckpt=... train a ControlNet: add experiment=controlnet_digits (or module=controlnet)")
    if controlnet and not cfg.get("base_ckpt"):
        raise ValueError("a ControlNet trains on top of a trained model: set base_ckpt=<its checkpoints/last.ckpt>")
    if controlnet and not cfg.get("control"):
        raise ValueError("module=controlnet needs a condition: control=lowres, edges or mask")
    if controlnet and not Path(cfg.base_ckpt).is_file():
        raise FileNotFoundError(f"base_ckpt={cfg.base_ckpt}: no such file (the checkpoint of the trained model to control)")
    if controlnet and Path(cfg.base_ckpt).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve()):
        raise ValueError(f"base_ckpt={cfg.base_ckpt} lies in this run's directory (paths.output_dir) and could be overwritten: write the ControlNet run elsewhere")


@contextlib.contextmanager
def process_group_closed_at_end():
    """Destroy the process group this run opened before the interpreter exits. Lightning does so only for NCCL;
    a gloo group left to interpreter shutdown can abort the process after its work is done (SIGABRT,
    "terminate called without an active exception")."""
    opened_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not opened_before and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from `cfg` and fit. Returns the final metrics."""
    filter_benign_messages()
    record = RunRecord(cfg)
    try:
        init_state = None
        if cfg.get("init_from"):  # fine-tune diffusers weights: the model config comes from the import
            init_state = init_train_config(cfg)
        fit_model_to_data(cfg)
        resolve_precision(cfg.trainer)
        OmegaConf.resolve(cfg)
        out = Path(cfg.paths.output_dir)
        _check_control(cfg)
        out.mkdir(parents=True, exist_ok=True)
        with RunLock(out), process_group_closed_at_end():
            return _train(cfg, out, init_state, record)
    finally:
        record.close()


def _train(cfg: DictConfig, out: Path, init_state: dict | None = None, record: RunRecord | None = None) -> dict[str, float]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    speed_settings(cfg)
    cpu = cpu_plugin(cfg)

    datamodule = build(cfg.data)
    module: DiffusionModule = build(cfg.module)
    if init_state is not None:
        module.net.load_state_dict(init_state)  # names and shapes checked by init_train_config
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cpu is not None:  # the CPU speed modules, and the routes they take kept in every checkpoint
        cpu.accelerate(module.net)
        callbacks.append(cpu.RoutesCallback())
    ckpt_path, found_in = cfg.get("ckpt_path"), None
    dirs = [c.dirpath for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint) and c.dirpath]
    root = cfg.trainer.get("default_root_dir") or out
    if ckpt_path is None:  # a requeued or restarted job: continue from the run directory's own checkpoint
        found = resume_checkpoint(root, dirs)
        if found is not None:
            log.info("Resuming from %s (found in the run directory)", found)
            ckpt_path, found_in = str(found), out
    elif ckpt_path in ("last", "hpc"):  # the file Lightning would pick, so that it gets the same checks
        found = last_checkpoint(dirs) if ckpt_path == "last" else hpc_checkpoint(root)
        if found is None and ckpt_path == "hpc":
            raise FileNotFoundError(f"ckpt_path=hpc: no hpc_ckpt_*.ckpt in {root}")
        if found is None:
            log.warning("ckpt_path=last: no last*.ckpt in %s; starting afresh", ", ".join(map(str, dirs)) or "(no checkpoint directory)")
        ckpt_path = None if found is None else str(found)
    if ckpt_path:
        check_resumable(ckpt_path, module, found_in)
    OmegaConf.save(cfg, out / "config.yaml")  # only now: a refused resume leaves the run's config as it was
    if record is not None:
        record.accept(out)  # .hydra/ and train.log, likewise
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

    filter_benign_messages()
    speed_settings(cfg)
    cpu = cpu_plugin(cfg)
    resolve_precision(cfg.trainer)
    if cfg.get("task", "sample") != "sample":  # inpaint / sdedit: ddpm_lightning.edits
        return edits.run(cfg)
    with process_group_closed_at_end():
        return run(cfg, accelerate=None if cpu is None else cpu.accelerate)
