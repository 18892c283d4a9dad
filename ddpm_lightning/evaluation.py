"""evaluate(cfg): sample a checkpoint with per-image seeds, sharded over DDP ranks and written shard by shard
(so an interrupted run continues), then FID / IS / KID against the reference statistics; see README "Evaluation".
"""

from __future__ import annotations

import contextlib
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

from ddpm_lightning import control as control_lib
from ddpm_lightning import guidance as guidance_lib
from ddpm_lightning import metrics as M
from ddpm_lightning.images import save_grid, to_model_range, to_uint8
from ddpm_lightning.module import DiffusionModule, _plain, count_nfe
from ddpm_lightning import registry
from ddpm_lightning.checkpointing import file_sha256
from ddpm_lightning.samplers import check_compatible
from ddpm_lightning.summary import evaluate_next_steps
from ddpm_lightning.tasks import build, load_model

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
    conditions (ControlNet models)."""
    calls, handle = count_nfe(module)
    out, nfe = [], 0
    try:
        for a in range(first, end, batch_size):
            seeds = list(range(a, min(a + batch_size, end)))
            calls[0] = 0
            if labels is not None:
                cond["labels"] = [labels[s] for s in seeds]
            if hints is not None:
                cond["hint"] = hints(seeds).to(module.device)
            out.append(to_uint8(module.sample(seeds, sampler=sampler, **cond)).cpu())
            nfe = calls[0]
            if pbar is not None:
                pbar.update(len(seeds))
    finally:
        handle.remove()
    return torch.cat(out).numpy(), nfe


def save_shard(path: Path, images: np.ndarray, first: int, end: int, nfe: int) -> None:
    """Write a shard atomically: a crash mid-write leaves no shard, never a truncated one."""
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, seeds=np.arange(first, end), nfe=nfe)
    os.replace(tmp, path)


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
    return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])


def _nll(cfg: DictConfig, module: DiffusionModule, data: torch.Tensor) -> dict[str, float]:
    """Bits/dim (Ho et al. 2020 §3.3 variational bound; Song et al. 2021 App. D probability-flow ODE)."""
    from ddpm_lightning.likelihood import bits_per_dim

    estimators = cfg.nll.get("estimators")
    if estimators is None:  # every estimator that applies: the bound needs DDPM's discrete buffers
        estimators = ["vlb", "ode"] if hasattr(module.schedule, "betas") else ["ode"]
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
    for key in ("num_samples", "batch_size", "shard_size"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]} must be positive")
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
    weights = "ema" if cfg.use_ema else "raw"
    folder = f"step{module.global_step_loaded}-{weights}-{name}{steps}-{ckpt_sha256[:8]}"
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


def evaluate(cfg: DictConfig, accelerate: Callable[[torch.nn.Module], Any] | None = None) -> dict[str, Any]:
    """Sample `num_samples` images from `ckpt_path` and compute `metrics`; returns what metrics.json holds.
    `accelerate`: applied to the loaded network (a speed plug-in's module swap, see tasks.evaluate)."""
    start = time.perf_counter()
    names = M.check_metric_names(cfg.metrics)
    _check(cfg, names)
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("init_from")):
        raise ValueError("give ckpt_path=<checkpoint> or init_from=<diffusers folder or Hub id>, exactly one of them")
    check_overrides([f"+{k}" for k in MODEL_KEYS if cfg.get(k) is not None])
    if cfg.get("init_from"):  # diffusers weights (README "Pretrained weights"); ckpt_path: their weights file
        from ddpm_lightning.diffusers_io import load_module, weights_file

        ckpt_path, module = weights_file(cfg.init_from), load_module(cfg.init_from, cfg.get("init_null_label"))
    else:
        ckpt_path = Path(cfg.ckpt_path)
        module = load_model(ckpt_path, use_ema=cfg.use_ema)
    if accelerate is not None:
        accelerate(module.net)
    if len(module.data_shape) != 3:  # a model of points (README "Toy data"): nothing here applies
        raise ValueError(f"ckpt_path={ckpt_path} models points of shape {module.data_shape}, not images; evaluate.py scores images")
    sampler_cfg = _plain(cfg.get("sampler")) or module.hparams.sampler
    sampler = registry.build(sampler_cfg, "sampler", f"ckpt_path={ckpt_path}" if cfg.get("sampler") is None else "config")
    # e.g. sampler.steps beyond the schedule's T, or variance=learned for a fixed-variance model, before any work
    check_compatible(sampler, module.schedule, module.denoiser.learn_sigma)
    # Labels and guidance (README "Guidance"): image i has class labels[i]; checked here, before any sampling.
    guidance_cfg = _plain(cfg.get("guidance"))
    guidance = guidance_lib.build(guidance_cfg)
    num_classes = guidance_lib.num_classes_of(guidance_lib.apply(module.denoiser, guidance))
    label_list, _ = guidance_lib.resolve_labels(_plain(cfg.get("labels")), cfg.num_samples, num_classes)
    if label_list is not None and len(label_list) != cfg.num_samples:
        raise ValueError(f"labels=all gives {len(label_list)} labels for num_samples={cfg.num_samples}: use a multiple of {num_classes}")
    labels = None if label_list is None else {cfg.seed_offset + i: k for i, k in enumerate(label_list)}
    if guidance is not None and labels is None:
        raise ValueError("guidance needs labels (a list of classes or 'all')")

    # ControlNet checkpoints: the condition of every image (README "ControlNet"), loaded before any sampling.
    datamodule = functools.cache(lambda: _datamodule(cfg, module))  # built once, for the reference, nll, conditions
    control = None
    if control_lib.is_controlled(module):
        control = control_lib.EvalConditions(_plain(cfg.get("control")) or {}, module, datamodule, cfg.seed_offset)

    fabric = L.Fabric(**cfg.trainer)  # strategy auto: DDP for several devices or nodes, torchrun / srun detected
    fabric.launch()
    module = module.to(fabric.device)
    ckpt_sha256 = file_sha256(ckpt_path)
    out = _output_dir(cfg, module, sampler_cfg, ckpt_sha256)
    shards_dir = out / "shards"
    fingerprint = {
        "ckpt_path": str(ckpt_path.resolve()),
        "ckpt_sha256": ckpt_sha256,
        "global_step": module.global_step_loaded,
        "use_ema": bool(cfg.use_ema),
        "sampler": sampler_cfg,
        "image_shape": list(module.image_shape),
        "precision": str(cfg.trainer.get("precision")),
        "labels": _plain(cfg.get("labels")),
        "guidance": guidance_cfg,
        "guidance_files": _files_sha256(guidance_cfg),
    }
    if control is not None:
        fingerprint["control"] = {**control.source, "scale": control.scale}

    # Everything that can fail is checked before the first image is sampled: weights, reference, output folder.
    extractor, reference, ref_info, nll_data = None, None, {}, None
    error = None
    if fabric.global_rank == 0:
        try:
            if set(names) & set(M.FIDELITY_METRICS):
                weights = M.resolve_inception_weights(cfg.inception.weights_path, "inception.weights_path")
                features = M.features_for(names, str(cfg.inception.feature))
                extractor = M.feature_extractor(weights, features, fabric.device)
            if {"fid", "kid"} & set(names):
                reference, ref_info = _reference(cfg, extractor, names, datamodule)
                n_ref = len(reference[str(cfg.inception.feature)]) if "mu" not in reference else None
                if "kid" in names and n_ref is not None and n_ref < cfg.kid_subset_size:
                    raise ValueError(f"the reference has {n_ref} images, below kid_subset_size={cfg.kid_subset_size}")
            if "nll" in names:
                nll_data = _nll_data(cfg, datamodule())
            shards_dir.mkdir(parents=True, exist_ok=True)
            fp_file = out / "fingerprint.json"
            if fp_file.is_file() and json.loads(fp_file.read_text()) != json.loads(json.dumps(fingerprint)):
                raise ValueError(
                    f"{out} holds samples of another model or sampler (see {fp_file}); choose another output_dir"
                )
            fp_file.write_text(json.dumps(fingerprint, indent=2))
            if cfg.get("process_strip"):  # the forward and reverse processes, README "From a random walk to DDPM"
                from ddpm_lightning.plots import data_images, save_process_strips

                log.info("Wrote %s", save_process_strips(module, data_images(datamodule(), 8), out, sampler, cfg.seed_offset))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    if fabric.world_size > 1:
        failed = fabric.broadcast(repr(error) if error is not None else None)
        if failed is not None and error is None:
            raise RuntimeError(f"evaluation stopped on rank 0: {failed}")
    if error is not None:
        raise error

    # Sampling: shard k goes to rank k % world_size; existing shards are kept.
    # metrics=[nll] alone scores the test images and samples nothing.
    sampled = bool(set(names) & set(M.FIDELITY_METRICS)) or not names
    shards = plan_shards(cfg.num_samples, cfg.shard_size, cfg.seed_offset) if sampled else []
    mine = [s for s in shards[fabric.global_rank :: fabric.world_size] if not shard_path(shards_dir, *s).is_file()]
    reused = len(shards) - len([s for s in shards if not shard_path(shards_dir, *s).is_file()])
    if fabric.global_rank == 0 and reused:
        log.info("Continuing: %d of %d shards already in %s", reused, len(shards), shards_dir)
    t0 = time.perf_counter()
    pbar = tqdm(total=sum(e - a for a, e in mine), desc="sampling", unit="img", disable=fabric.global_rank != 0 or not mine)
    with fabric.autocast():
        for first, end in mine:
            cond = {} if guidance is None else {"guidance": guidance}
            if control is not None:
                cond.update(hints=control, conditioning_scale=control.scale)
            images, nfe = sample_shard(module, sampler, first, end, cfg.batch_size, pbar, labels, **cond)
            save_shard(shard_path(shards_dir, first, end), images, first, end, nfe)
    pbar.close()
    sampling_s = time.perf_counter() - t0
    fabric.barrier()

    result: dict[str, Any] = {}
    if fabric.global_rank == 0:
        loaded = [load_shard(shard_path(shards_dir, *s), *s) for s in shards]
        images = np.concatenate([x for x, _ in loaded]) if loaded else np.zeros((0, *module.image_shape), np.uint8)
        nfe = loaded[0][1] if loaded else 0
        result = _finish(cfg, module, images, nfe, names, extractor, reference, ref_info, out, sampler_cfg, ckpt_path)
        if control is not None and len(images):
            _control_result(cfg, module, control, images, result, out)
        if nll_data is not None:  # rank 0 alone; the other ranks wait at the broadcast below
            t0 = time.perf_counter()
            result["metrics"].update(_nll(cfg, module, nll_data))
            result["nll_time_s"] = time.perf_counter() - t0
        result["wall_time_s"] = {"sampling": sampling_s, "total": time.perf_counter() - start}
        result["world_size"] = fabric.world_size
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        _summary(result, out, module.schedule)
    if fabric.world_size > 1:
        result = fabric.broadcast(result)
    return result


def _finish(cfg, module, images, nfe, names, extractor, reference, ref_info, out, sampler_cfg, ckpt_path) -> dict:
    """Write the sample set (npz / PNGs / grid) and compute the metrics (rank 0)."""
    first = cfg.seed_offset
    if len(images) and cfg.save_npz:  # [N, H, W, C] uint8 under arr_0, the layout of the TF / ADM evaluation suites
        np.savez(out / "samples.npz", arr_0=images.transpose(0, 2, 3, 1))
    if cfg.save_png:
        folder = out / "images"
        folder.mkdir(exist_ok=True)
        for i, x in enumerate(images):
            Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(folder / f"{first + i:08d}.png")
    if len(images) and cfg.grid_size:
        save_grid(to_model_range(torch.from_numpy(images[: cfg.grid_size])), out / "grid.png")
    values: dict[str, float] = {}
    f_time = 0.0
    if extractor is not None:
        t0 = time.perf_counter()
        features = M.extract_features(torch.from_numpy(images), extractor, cfg.inception.batch_size)
        values = M.compute_metrics(
            names, features, reference, cfg.isc_splits, cfg.kid_subsets, cfg.kid_subset_size,
            feature=str(cfg.inception.feature),
        )
        f_time = time.perf_counter() - t0
    name = sampler_cfg.get("_target_", "").rsplit(".", 1)[-1]
    return {
        "metrics": values,
        "sampler": name,
        "sampler_config": sampler_cfg,
        "steps": sampler_cfg.get("steps", getattr(module.schedule, "T", None)),
        "nfe": nfe,
        "num_samples": int(len(images)),
        "seeds": {"first": first, "last": first + len(images) - 1},
        "checkpoint": {"path": str(ckpt_path), "global_step": module.global_step_loaded, "use_ema": bool(cfg.use_ema)},
        "reference": ref_info,
        "feature_extractor": f"inception-v3-compat ({cfg.inception.feature})" if extractor is not None else None,
        "features_time_s": f_time,
    }


def _control_result(cfg, module, control, images: np.ndarray, result: dict, out: Path) -> None:
    """ControlNet: the adherence error of the samples to their conditions (next to the other metrics), and the
    grid as condition | sample pairs."""
    samples = to_model_range(torch.from_numpy(images))
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + len(images)))
    result["metrics"]["adherence"] = control.adherence(samples, seeds)
    result["control"] = {**control.source, "scale": control.scale, "condition": type(module.net.condition).__name__}
    if cfg.grid_size:
        n = min(cfg.grid_size, len(samples))
        pairs = control_lib.condition_pairs(module, control(seeds[:n]), samples[:n])
        save_grid(pairs.flatten(0, 1), out / "grid.png", nrow=2 * max(1, int(n**0.5)))


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
