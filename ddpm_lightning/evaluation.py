"""evaluate(cfg): sample a checkpoint with per-image seeds, sharded over DDP ranks and written shard by shard
(so an interrupted run continues), then FID / IS / KID against the reference statistics; see README "Evaluation".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ddpm_lightning import metrics as M
from ddpm_lightning import registry
from ddpm_lightning.batch import unpack
from ddpm_lightning.checkpointing import file_sha256, write_error
from ddpm_lightning.compose import build
from ddpm_lightning.control import module as control_lib
from ddpm_lightning.diffusion import guidance as guidance_lib
from ddpm_lightning.diffusion.likelihood import bits_per_dim
from ddpm_lightning.diffusion.samplers import check_compatible
from ddpm_lightning.images import save_grid, to_model_range, to_uint8
from ddpm_lightning.interop.diffusers import load_module, weights_file
from ddpm_lightning.loading import combine_controlnets, load_model
from ddpm_lightning.plots import data_images, save_process_strips
from ddpm_lightning.summary import evaluate_next_steps
from ddpm_lightning.training.module import DiffusionModule, _plain, count_nfe
from ddpm_lightning.training.posthoc_ema import sigma_rel_to_gamma, write_checkpoint

log = logging.getLogger(__name__)


def plan_shards(num_samples: int, shard_size: int, seed_offset: int = 0) -> list[tuple[int, int]]:
    """The seed ranges [first, end) of the shards; image i has seed seed_offset + i."""
    return [(seed_offset + a, seed_offset + min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(folder: Path, first: int, end: int) -> Path:
    return folder / f"seeds_{first:08d}-{end:08d}.npz"


def sample_shard(
    module: DiffusionModule, sampler: Any, first: int, end: int, batch_size: int, pbar=None,
    labels: dict[int, int] | None = None, hints: Callable | None = None, **cond,
) -> tuple[np.ndarray, int]:
    """uint8 images [n, C, H, W] for seeds first..end-1, in batches of `batch_size` counted from `first` (so a
    shard is batched the same way whatever the number of processes), and the network evaluations per image.
    `labels`: the class of each seed (class-conditional models, classifier guidance); `hints`: seeds -> their
    conditions (ControlNet models; a list of them for several ControlNets)."""
    calls, handle = count_nfe(module)
    out, nfe = [], 0
    try:
        for a in range(first, end, batch_size):
            seeds = list(range(a, min(a + batch_size, end)))
            calls[0] = 0
            if labels is not None:
                cond["labels"] = [labels[s] for s in seeds]
            if hints is not None:
                hint = hints(seeds)
                cond["hint"] = [h.to(module.device) for h in hint] if isinstance(hint, list) else hint.to(module.device)
            x = module.sample(seeds, sampler=sampler, **cond)
            if not torch.isfinite(x).all():  # would be written as black images
                raise FloatingPointError(
                    f"the samples of seeds {seeds[0]}..{seeds[-1]} are not finite (NaN or inf): check the checkpoint's "
                    "weights (ckpt_path) and the sampler and guidance settings"
                )
            out.append(to_uint8(x).cpu())
            nfe = calls[0]
            if pbar is not None:
                pbar.update(len(seeds))
    finally:
        handle.remove()
    return torch.cat(out).numpy(), nfe


def save_shard(path: Path, images: np.ndarray, first: int, end: int, nfe: int) -> None:
    """Write a shard atomically: a crash mid-write leaves no shard, never a truncated one."""
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, images=images, seeds=np.arange(first, end), nfe=nfe)
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def load_shard(path: Path, first: int, end: int) -> tuple[np.ndarray, int]:
    with np.load(path) as f:
        if not np.array_equal(f["seeds"], np.arange(first, end)):
            raise ValueError(f"{path} holds other seeds than its name says; delete it and re-run")
        return f["images"], int(f["nfe"])


def _checkpoint_data_config(ckpt_path: Path) -> dict:
    """The data config of the run that wrote `ckpt_path` (<run>/checkpoints/x.ckpt -> <run>/config.yaml), read as
    plain YAML (never resolved by OmegaConf) and checked against the registry's data modules."""
    run_cfg = ckpt_path.resolve().parent.parent / "config.yaml"
    if not run_cfg.is_file():
        raise FileNotFoundError(
            f"reference statistics: {run_cfg} (the checkpoint's run config) is missing, so the checkpoint's dataset "
            "is unknown. Choose it with data=<name> (e.g. data=digits), or give reference.folder=<folder of images> "
            "or reference.stats=<.npz with mu and sigma>."
        )
    source = f"the checkpoint's run config {run_cfg}"
    try:
        run = yaml.safe_load(run_cfg.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not readable YAML ({type(e).__name__}: {e}); choose the dataset with data=<name>") from None
    if not isinstance(run, dict) or not isinstance(run.get("data"), dict):
        raise ValueError(f"{source} has no data config; choose the dataset with data=<name>")
    registry.check(run["data"], "data", source, "data")
    return run["data"]


def _datamodule(cfg: DictConfig, module: DiffusionModule):
    """The checkpoint's DataModule (its run's data config, or data=<name>), checked against the model."""
    if not cfg.get("data") and not cfg.get("ckpt_path"):
        raise ValueError(
            f"init_from={cfg.init_from}: an imported model has no run config naming its dataset; choose it with "
            "data=<name> (e.g. data=cifar10), or give reference.folder=<folder of images> or reference.stats=<.npz>"
        )
    if cfg.get("data"):  # the user's choice (conf/data, the command line)
        datamodule = build(cfg.data)
    else:  # the run's stored config: data, built through the registry (it never downloads)
        run_cfg = _checkpoint_data_config(Path(cfg.ckpt_path))
        datamodule = registry.build(run_cfg, "data", f"the checkpoint's run config ({cfg.ckpt_path})", "data")
    size = dict(getattr(datamodule, "hparams", {})).get("image_size")
    if size is not None and size != module.hparams.image_size:
        raise ValueError(f"data.image_size={size} differs from the checkpoint's image_size={module.hparams.image_size}")
    return datamodule


def _nll_data(cfg: DictConfig, datamodule) -> torch.Tensor:
    """The images whose bits/dim metrics=[nll] reports: the `nll.split` set (val: CIFAR-10's test split),
    its first `nll.max_images`; loaded before any sampling so a missing dataset fails first."""
    datamodule.setup("validate")
    dataset = getattr(datamodule, f"{cfg.nll.split}_set", None)
    if dataset is None:
        raise ValueError(f"nll.split={cfg.nll.split!r}: the data module has no {cfg.nll.split}_set (use train or val)")
    n = len(dataset) if cfg.nll.get("max_images") is None else min(len(dataset), int(cfg.nll.max_images))
    if n == 0:
        raise ValueError(f"nll.split={cfg.nll.split!r} holds no images")
    items = [dataset[i] for i in range(n)]
    return torch.stack([unpack(x)["x"] for x in items])


def _nll(cfg: DictConfig, module: DiffusionModule, data: torch.Tensor) -> dict[str, float]:
    """Bits/dim (Ho et al. 2020 §3.3 variational bound; Song et al. 2021 App. D probability-flow ODE)."""

    estimators = cfg.nll.get("estimators")
    if estimators is None:  # every estimator that applies: the bound needs DDPM's discrete buffers
        estimators = ["vlb", "ode"] if module.schedule.discrete else ["ode"]
    with getattr(module.net, "sampling_context", contextlib.nullcontext)():  # a speed plug-in's, if any
        values = bits_per_dim(
            module, data, estimators=list(estimators), seed=cfg.seed_offset, batch_size=cfg.nll.batch_size,
            rtol=cfg.nll.rtol, atol=cfg.nll.atol,
        )
    return {f"nll/{k}": float(v) for k, v in values.items()}


def _reference(cfg: DictConfig, extractor, names: list[str], datamodule: Callable) -> tuple[dict, dict]:
    """Reference features or statistics (see README: stats file, folder, or the checkpoint's training split)."""
    ref = cfg.reference
    if ref.get("stats"):
        data = M.load_stats_file(ref.stats)
        if "kid" in names and str(cfg.inception.feature) not in data:
            raise ValueError(f"metrics=[kid] needs reference features, but reference.stats={ref.stats} holds only mu / sigma")
        return data, {"stats": str(ref.stats)}
    if ref.get("folder"):
        dataset = M.folder_images(ref.folder)
        feature = str(cfg.inception.feature)
        features = M.extract_features(dataset, extractor, cfg.inception.batch_size)
        return {feature: features[feature]}, {"folder": str(ref.folder), "images": len(dataset), "feature": feature}
    return M.datamodule_reference_features(
        datamodule(), extractor, ref.split, ref.get("max_images"), ref.get("cache_dir"), cfg.inception.batch_size,
        str(cfg.inception.feature),
    )


def _check(cfg: DictConfig, names: list[str]) -> None:
    for key in ("num_samples", "batch_size", "shard_size", "seed_offset"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed_offset" else 1):
            raise ValueError(f"{key}={value!r} must be a {'non-negative' if key == 'seed_offset' else 'positive'} integer")
    if not isinstance(cfg.get("use_ema"), bool):
        raise ValueError(f"use_ema={cfg.get('use_ema')!r} must be true or false")
    if _posthoc_sigma_rel(cfg) is not None:
        sigma_rel_to_gamma(_posthoc_sigma_rel(cfg), "posthoc_ema.sigma_rel")
        if cfg.get("init_from") or not cfg.use_ema:
            raise ValueError("posthoc_ema.sigma_rel replaces the EMA weights of a checkpoint of ours (ckpt_path=...): "
                             "it takes use_ema=true and no init_from")
    M.features_for(names, str(cfg.inception.feature))
    n = cfg.num_samples
    if "isc" in names and n < cfg.isc_splits:
        raise ValueError(f"num_samples={n} is below isc_splits={cfg.isc_splits}; lower isc_splits")
    if "kid" in names and n < cfg.kid_subset_size:
        raise ValueError(f"num_samples={n} is below kid_subset_size={cfg.kid_subset_size}; lower kid_subset_size")


def _output_dir(cfg: DictConfig, module: DiffusionModule, sampler_cfg: dict, ckpt_sha256: str) -> Path:
    """output_dir, or <run>/eval/step<step>-<ema|raw>-<sampler><steps>-<first 8 hex digits of the checkpoint's
    sha256>: a checkpoint replaced by another (same name, same step) gets a folder of its own."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    name = sampler_cfg.get("_target_", "sampler").rsplit(".", 1)[-1]
    steps = sampler_cfg.get("steps") or getattr(module.schedule, "T", "")
    sigma_rel = _posthoc_sigma_rel(cfg)
    weights = ("ema" if cfg.use_ema else "raw") if sigma_rel is None else f"posthoc{sigma_rel:.3f}"
    folder = f"step{module.global_step_loaded}-{weights}-{name}{steps}-{ckpt_sha256[:8]}"
    folder += "".join(f"+{file_sha256(p)[:8]}" for p in _control_ckpts(cfg))  # further ControlNets
    if not cfg.get("ckpt_path"):  # an imported diffusers model (init_from): outputs/imported/<folder name>/
        return Path(cfg.paths.log_dir) / "imported" / Path(str(cfg.init_from)).name / f"{name}{steps}-{ckpt_sha256[:8]}"
    return Path(cfg.ckpt_path).resolve().parent.parent / "eval" / folder


# Config keys that describe the model, which evaluation takes from the checkpoint.
MODEL_KEYS = ("model", "schedule", "module")


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides of the model (`model.ch=64`, `+schedule=cosine`, ...) with the reason, before
    Hydra composes the config (where they would fail with a hint to add them with `+`, and then be ignored)."""
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if not arg.startswith("-") and key.split(".", 1)[0].split("@", 1)[0] in MODEL_KEYS:
            raise ValueError(
                f"evaluate.py {arg}: the model ({', '.join(k + '.*' for k in MODEL_KEYS)}) comes from the checkpoint "
                "(ckpt_path) and cannot be changed here; what evaluation can choose is sampler=..., sampler.*, "
                "guidance, labels, use_ema and the metrics options (conf/evaluate.yaml)"
            )


def _files_sha256(tree: Any) -> dict[str, str]:
    """sha256 of every existing file a config names (e.g. a guidance classifier checkpoint)."""
    if isinstance(tree, dict):
        return {k: v for value in tree.values() for k, v in _files_sha256(value).items()}
    if isinstance(tree, list):
        return {k: v for value in tree for k, v in _files_sha256(value).items()}
    if isinstance(tree, str) and len(tree) < 4096 and Path(tree).is_file():
        return {str(Path(tree).resolve()): file_sha256(tree)}
    return {}


@dataclasses.dataclass
class EvalPlan:
    """What an evaluation will do, settled and checked before anything is sampled (`plan`)."""

    cfg: DictConfig
    names: list[str]  # the metrics
    module: DiffusionModule
    ckpt_path: Path  # the checkpoint (or, for init_from, the imported weights file)
    sampler_cfg: dict
    sampler: Any
    guidance_cfg: Any
    guidance: Any
    labels: dict[int, int] | None  # seed -> class
    control: Any = None  # ControlNet conditions (control.module.EvalConditions)
    out: Path | None = None  # output folder, once the device is known (`prepare`)
    fingerprint: dict | None = None

    @functools.cached_property
    def datamodule(self):
        """The checkpoint's DataModule (for the reference, bits/dim and conditions), built once when first needed."""
        return _datamodule(self.cfg, self.module)

    @property
    def shards(self) -> list[tuple[int, int]]:
        """The seed ranges of the sample shards; none for metrics=[nll] alone, which samples nothing."""
        sampled = bool(set(self.names) & set(M.FIDELITY_METRICS)) or not self.names
        return plan_shards(self.cfg.num_samples, self.cfg.shard_size, self.cfg.seed_offset) if sampled else []


@dataclasses.dataclass
class Prepared:
    """What rank 0 made ready before sampling: the scorer (feature extractor + reference) and bits/dim data."""

    scorer: M.Scorer | None = None
    ref_info: dict = dataclasses.field(default_factory=dict)
    nll_data: torch.Tensor | None = None


def evaluate(cfg: DictConfig, accelerate: Callable[[torch.nn.Module], Any] | None = None) -> dict[str, Any]:
    """Sample `num_samples` images from `ckpt_path` and compute `metrics`; returns what metrics.json holds.
    plan (checks, no device) -> prepare (rank 0: scorer, output folder) -> sample (shards over ranks) -> score.
    `accelerate`: applied to the loaded network (a speed plug-in's module swap, see tasks.evaluate)."""
    start = time.perf_counter()
    plan = make_plan(cfg, accelerate)
    fabric = L.Fabric(**cfg.trainer)  # strategy auto: DDP for several devices or nodes, torchrun / srun detected
    fabric.launch()
    plan.module = plan.module.to(fabric.device)
    prepared = prepare(plan, fabric)
    sampling_s = sample(plan, fabric)
    result: dict[str, Any] = {}
    if fabric.global_rank == 0:
        result = score(plan, prepared)
        result["wall_time_s"] = {"sampling": sampling_s, "total": time.perf_counter() - start}
        result["world_size"] = fabric.world_size
        (plan.out / "metrics.json").write_text(json.dumps(result, indent=2))
        _summary(result, plan.out, plan.module.schedule)
    if fabric.world_size > 1:
        result = fabric.broadcast(result)
    return result


def make_plan(cfg: DictConfig, accelerate: Callable[[torch.nn.Module], Any] | None = None) -> EvalPlan:
    """The model, sampler, labels, guidance and conditions of an evaluation, every setting checked."""
    names = M.check_metric_names(cfg.metrics)
    _check(cfg, names)
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("init_from")):
        raise ValueError("give ckpt_path=<checkpoint> or init_from=<diffusers folder or Hub id>, exactly one of them")
    check_overrides([f"+{k}" for k in MODEL_KEYS if cfg.get(k) is not None])
    if cfg.get("init_from"):  # diffusers weights (docs "diffusers"); ckpt_path: their weights file
        ckpt_path, module = weights_file(cfg.init_from), load_module(cfg.init_from, cfg.get("init_null_label"))
    else:
        ckpt_path = Path(cfg.ckpt_path) if _posthoc_sigma_rel(cfg) is None else posthoc_checkpoint(cfg)
        module = load_model(ckpt_path, use_ema=cfg.use_ema)
    extra = _control_ckpts(cfg)
    if extra:  # several ControlNets over one base (Zhang et al. 2023 Sec. 3.5): ckpt_path's and control.ckpts'
        others = [load_model(p, use_ema=cfg.use_ema) for p in extra]
        module = combine_controlnets([module, *others], [f"ckpt_path={ckpt_path}", *(f"control.ckpts={p}" for p in extra)],
                                     (cfg.get("control") or {}).get("scale", 1.0))
    if accelerate is not None:
        accelerate(module.net)
    if len(module.data_shape) != 3:  # a model of points (docs "Toy data"): nothing here applies
        raise ValueError(f"ckpt_path={ckpt_path} models points of shape {module.data_shape}, not images; evaluate.py scores images")
    sampler_cfg = _plain(cfg.get("sampler")) or module.hparams.sampler
    sampler = registry.build(sampler_cfg, "sampler", f"ckpt_path={ckpt_path}" if cfg.get("sampler") is None else "config")
    # e.g. sampler.steps beyond the schedule's T, or variance=learned for a fixed-variance model, before any work
    check_compatible(sampler, module.schedule, module.denoiser.learn_sigma)
    guidance_cfg = _plain(cfg.get("guidance"))
    guidance = guidance_lib.build(guidance_cfg)
    plan = EvalPlan(cfg, names, module, ckpt_path, sampler_cfg, sampler, guidance_cfg, guidance, _labels(cfg, module, guidance))
    if control_lib.is_controlled(module):  # the condition of every image, loaded before any sampling
        plan.control = control_lib.eval_conditions(_plain(cfg.get("control")) or {}, module, lambda: plan.datamodule, cfg.seed_offset)
    return plan


def _control_ckpts(cfg: DictConfig) -> list[str]:
    """control.ckpts: the ControlNet checkpoints summed with ckpt_path's (none: [])."""
    ckpts = _plain((cfg.get("control") or {}).get("ckpts")) or []
    if isinstance(ckpts, str) or not all(isinstance(p, str) for p in ckpts):
        raise ValueError(f"control.ckpts={ckpts!r} must be a list of ControlNet checkpoints, e.g. control.ckpts=[b.ckpt]")
    if ckpts and (cfg.get("init_from") or not cfg.get("ckpt_path")):
        raise ValueError("control.ckpts adds ControlNets to the one of ckpt_path=<ControlNet checkpoint>; give ckpt_path")
    for p in ckpts:
        if not Path(p).is_file():
            raise FileNotFoundError(f"control.ckpts: {p} is not a file (a ControlNet checkpoint)")
    return list(ckpts)


def _posthoc_sigma_rel(cfg: DictConfig) -> float | None:
    return (cfg.get("posthoc_ema") or {}).get("sigma_rel")


def posthoc_checkpoint(cfg: DictConfig) -> Path:
    """posthoc_ema.sigma_rel: the checkpoint of the post-hoc EMA of that width at ckpt_path's step (Karras et al.
    2024), reconstructed from the run's snapshots and written next to ckpt_path (ddpm_lightning.training.posthoc_ema)."""
    template = Path(cfg.ckpt_path)
    if not template.is_file():
        raise FileNotFoundError(f"checkpoint not found: {template} (check ckpt_path)")
    run_dir = template.resolve().parent.parent
    try:
        path = write_checkpoint(run_dir, _posthoc_sigma_rel(cfg), template=template, snapshots=cfg.posthoc_ema.get("snapshots"), template_step=True)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"posthoc_ema.sigma_rel={_posthoc_sigma_rel(cfg)} with ckpt_path={template}: {e}") from None
    log.info("Post-hoc EMA, sigma_rel=%s: wrote %s", _posthoc_sigma_rel(cfg), path)
    return path


def _labels(cfg: DictConfig, module: DiffusionModule, guidance: Any) -> dict[int, int] | None:
    """seed -> class of each image (class-conditional models, guidance): image i has class labels[i]."""
    num_classes = guidance_lib.num_classes_of(guidance_lib.apply(module.denoiser, guidance))
    label_list, _ = guidance_lib.resolve_labels(_plain(cfg.get("labels")), cfg.num_samples, num_classes)
    if label_list is not None and len(label_list) != cfg.num_samples:
        raise ValueError(f"labels=all gives {len(label_list)} labels for num_samples={cfg.num_samples}: use a multiple of {num_classes}")
    if guidance is not None and label_list is None:
        raise ValueError("guidance needs labels (a list of classes or 'all')")
    return None if label_list is None else {cfg.seed_offset + i: k for i, k in enumerate(label_list)}


def _fingerprint(plan: EvalPlan, ckpt_sha256: str) -> dict:
    """Everything the samples depend on: an output folder holding another fingerprint is never continued."""
    cfg = plan.cfg
    fingerprint = {
        "ckpt_path": str(plan.ckpt_path.resolve()), "ckpt_sha256": ckpt_sha256,
        "global_step": plan.module.global_step_loaded, "use_ema": bool(cfg.use_ema), "sampler": plan.sampler_cfg,
        "image_shape": list(plan.module.image_shape), "precision": str(cfg.trainer.get("precision")),
        "labels": _plain(cfg.get("labels")), "guidance": plan.guidance_cfg, "guidance_files": _files_sha256(plan.guidance_cfg),
    }
    if plan.control is not None:
        fingerprint["control"] = {**plan.control.source, "scale": plan.control.scale}
        if _control_ckpts(cfg):
            fingerprint["control"]["ckpts"] = _files_sha256(_control_ckpts(cfg))
    return fingerprint


def prepare(plan: EvalPlan, fabric: L.Fabric) -> Prepared:
    """Everything that can fail, before the first image is sampled (rank 0; a failure stops every rank): the
    Inception weights and the reference, bits/dim data, the output folder and its fingerprint."""
    cfg, names = plan.cfg, plan.names
    ckpt_sha256 = file_sha256(plan.ckpt_path)
    plan.out = _output_dir(cfg, plan.module, plan.sampler_cfg, ckpt_sha256)
    plan.fingerprint = _fingerprint(plan, ckpt_sha256)
    prepared, error = Prepared(), None
    if fabric.global_rank == 0:
        try:
            if set(names) & set(M.FIDELITY_METRICS):
                prepared.scorer, prepared.ref_info = _scorer(plan, fabric.device)
            if "nll" in names:
                prepared.nll_data = _nll_data(cfg, plan.datamodule)
            _claim_output_dir(plan.out, plan.fingerprint)
            if cfg.get("process_strip"):  # the forward and reverse processes (docs "Physics")
                log.info("Wrote %s", save_process_strips(plan.module, data_images(plan.datamodule, 8), plan.out, plan.sampler, cfg.seed_offset))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    if fabric.world_size > 1:
        failed = fabric.broadcast(repr(error) if error is not None else None)
        if failed is not None and error is None:
            raise RuntimeError(f"evaluation stopped on rank 0: {failed}")
    if error is not None:
        raise error
    return prepared


def _scorer(plan: EvalPlan, device: torch.device) -> tuple[M.Scorer, dict]:
    """The Inception feature extractor and the reference of the requested metrics."""
    cfg, names = plan.cfg, plan.names
    weights = M.resolve_inception_weights(cfg.inception.weights_path, "inception.weights_path")
    extractor = M.feature_extractor(weights, M.features_for(names, str(cfg.inception.feature)), device)
    reference, ref_info = None, {}
    if {"fid", "kid"} & set(names):
        reference, ref_info = _reference(cfg, extractor, names, lambda: plan.datamodule)
        n_ref = len(reference[str(cfg.inception.feature)]) if "mu" not in reference else None
        if "kid" in names and n_ref is not None and n_ref < cfg.kid_subset_size:
            raise ValueError(f"the reference has {n_ref} images, below kid_subset_size={cfg.kid_subset_size}")
    options = {"isc_splits": cfg.isc_splits, "kid_subsets": cfg.kid_subsets, "kid_subset_size": cfg.kid_subset_size}
    return M.Scorer(extractor, reference, str(cfg.inception.feature), cfg.inception.batch_size, options), ref_info


def _claim_output_dir(out: Path, fingerprint: dict) -> None:
    """Create the output folder and write its fingerprint. Shards already there are continued only under the same
    fingerprint (without one they may be any model's) and with the model's image shape; a folder without shards
    (e.g. of a run that failed before sampling) is taken over."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    fp_file = out / "fingerprint.json"
    shards = sorted(p for p in (out / "shards").glob("seeds_*.npz") if ".tmp" not in p.name)
    if shards and not fp_file.is_file():
        raise ValueError(f"output_dir={out} holds {len(shards)} sample shards but no {fp_file.name}, so they may be "
                         "another model's samples; choose another output_dir")
    if shards and json.loads(fp_file.read_text()) != json.loads(json.dumps(fingerprint)):
        raise ValueError(f"{out} holds samples of another model or sampler (see {fp_file}); choose another output_dir")
    for path in shards:
        with np.load(path) as f:
            shape = tuple(f["images"].shape[1:])
        if shape != tuple(fingerprint["image_shape"]):
            raise ValueError(f"output_dir={out}: {path.name} holds images of shape {shape}, the model samples "
                             f"{tuple(fingerprint['image_shape'])}; choose another output_dir")
    fp_file.write_text(json.dumps(fingerprint, indent=2))


def sample(plan: EvalPlan, fabric: L.Fabric) -> float:
    """Sample the shards missing from the output folder (shard k on rank k % world_size); seconds taken."""
    shards, shards_dir = plan.shards, plan.out / "shards"
    mine = [s for s in shards[fabric.global_rank :: fabric.world_size] if not shard_path(shards_dir, *s).is_file()]
    reused = len([s for s in shards if shard_path(shards_dir, *s).is_file()])
    if fabric.global_rank == 0 and reused:
        log.info("Continuing: %d of %d shards already in %s", reused, len(shards), shards_dir)
    t0 = time.perf_counter()
    pbar = tqdm(total=sum(e - a for a, e in mine), desc="sampling", unit="img", disable=fabric.global_rank != 0 or not mine)
    cond = {} if plan.guidance is None else {"guidance": plan.guidance}
    if plan.control is not None:
        cond.update(hints=plan.control, conditioning_scale=plan.control.scale)
    with fabric.autocast():
        for first, end in mine:
            images, nfe = sample_shard(plan.module, plan.sampler, first, end, plan.cfg.batch_size, pbar, plan.labels, **cond)
            save_shard(shard_path(shards_dir, first, end), images, first, end, nfe)
    pbar.close()
    fabric.barrier()
    return time.perf_counter() - t0


def score(plan: EvalPlan, prepared: Prepared) -> dict:
    """Write the sample set (npz / PNGs / grid) and compute the metrics and bits/dim (rank 0)."""
    cfg, module = plan.cfg, plan.module
    loaded = [load_shard(shard_path(plan.out / "shards", *s), *s) for s in plan.shards]
    images = np.concatenate([x for x, _ in loaded]) if loaded else np.zeros((0, *module.image_shape), np.uint8)
    _save_samples(cfg, images, plan.out)
    values, f_time = {}, 0.0
    if prepared.scorer is not None:
        t0 = time.perf_counter()
        values = prepared.scorer(torch.from_numpy(images), plan.names)
        f_time = time.perf_counter() - t0
    first = cfg.seed_offset
    result = {
        "metrics": values,
        "sampler": plan.sampler_cfg.get("_target_", "").rsplit(".", 1)[-1],
        "sampler_config": plan.sampler_cfg,
        "steps": plan.sampler_cfg.get("steps", getattr(module.schedule, "T", None)),
        "nfe": loaded[0][1] if loaded else 0,
        "num_samples": int(len(images)),
        "seeds": {"first": first, "last": first + len(images) - 1},
        "checkpoint": {"path": str(plan.ckpt_path), "global_step": module.global_step_loaded, "use_ema": bool(cfg.use_ema)},
        "reference": prepared.ref_info,
        "feature_extractor": f"inception-v3-compat ({cfg.inception.feature})" if prepared.scorer is not None else None,
        "features_time_s": f_time,
    }
    if _posthoc_sigma_rel(cfg) is not None:
        result["checkpoint"]["posthoc_ema_sigma_rel"] = _posthoc_sigma_rel(cfg)
    if plan.control is not None and len(images):
        _control_result(cfg, module, plan.control, images, result, plan.out)
    if prepared.nll_data is not None:
        t0 = time.perf_counter()
        result["metrics"].update(_nll(cfg, module, prepared.nll_data))
        result["nll_time_s"] = time.perf_counter() - t0
    return result


def _save_samples(cfg: DictConfig, images: np.ndarray, out: Path) -> None:
    """samples.npz ([N, H, W, C] uint8 under arr_0, the layout of the TF / ADM evaluation suites), PNGs, grid."""
    if len(images) and cfg.save_npz:
        np.savez(out / "samples.npz", arr_0=images.transpose(0, 2, 3, 1))
    if cfg.save_png:
        folder = out / "images"
        folder.mkdir(exist_ok=True)
        for i, x in enumerate(images):
            Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(folder / f"{cfg.seed_offset + i:08d}.png")
    if len(images) and cfg.grid_size:
        save_grid(to_model_range(torch.from_numpy(images[: cfg.grid_size])), out / "grid.png")


def _control_result(cfg, module, control, images: np.ndarray, result: dict, out: Path) -> None:
    """ControlNet: the adherence error of the samples to their conditions (next to the other metrics), and the
    grid as condition | sample pairs."""
    samples = to_model_range(torch.from_numpy(images))
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + len(images)))
    result["metrics"].update(control.metrics(samples, seeds))
    result["control"] = control.describe()
    if cfg.grid_size:
        n = min(cfg.grid_size, len(samples))
        shown = control.shown(seeds[:n], samples[:n])  # [n, conditions + 1, C, H, W]
        save_grid(shown.flatten(0, 1), out / "grid.png", nrow=shown.shape[1] * max(1, int(n**0.5)))


def _summary(result: dict, out: Path, schedule: Any = None) -> None:
    lines = [
        f"Evaluated {result['num_samples']} samples (seeds {result['seeds']['first']}..{result['seeds']['last']}) of "
        f"{result['checkpoint']['path']} at step {result['checkpoint']['global_step']}",
        f"  sampler {result['sampler']}, {result['steps']} steps, {result['nfe']} network evaluations per image",
    ]
    lines += [f"  {k:8s} {v:.4f}" for k, v in result["metrics"].items()]
    lines.append(f"  wall time {result['wall_time_s']['total']:.1f} s (sampling {result['wall_time_s']['sampling']:.1f} s); written to {out}")
    lines += evaluate_next_steps(result, out, schedule)
    print("\n".join(lines), flush=True)
