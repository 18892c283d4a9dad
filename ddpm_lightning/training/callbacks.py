"""Training callbacks: EMA of the weights, periodic sample grids and in-training FID."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf
from torch import Tensor

from ddpm_lightning import metrics as M
from ddpm_lightning import registry
from ddpm_lightning.diffusion import guidance as guidance_lib
from ddpm_lightning.diffusion.samplers import check_compatible
from ddpm_lightning.images import save_grid, to_uint8
from ddpm_lightning.metrics import features_for, resolve_inception_weights
from ddpm_lightning.plots import save_scatter
from ddpm_lightning.seeds import rank_share
from ddpm_lightning.training.module import count_nfe


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (Ho et al. App. B: decay 0.9999), built on Lightning's
    `EMAWeightAveraging`: kept on every rank, saved in the checkpoint (its weights become the checkpoint's
    `state_dict`, the raw ones `current_model_state`), swapped in for validation.

    With `warmup`, the decay at update n is min(decay, (1 + n) / (10 + n)) (Tarvainen & Valpola 2017, as in
    TensorFlow's ExponentialMovingAverage with num_updates), so short runs get a useful average. The update
    is one fused `_foreach_lerp_` over all tensors with the decay kept on the device (no host sync).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False, update_every_n_steps: int = 1, **kwargs: Any):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must lie in [0, 1)")
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps, **kwargs)
        self.decay, self.warmup = decay, warmup
        # Replace the per-tensor average of the parent with one fused update.
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = self._ema_update

    def decay_at(self, num_averaged: Tensor) -> Tensor:
        """The decay used for the update after `num_averaged` earlier updates."""
        if not self.warmup:
            return torch.full_like(num_averaged, self.decay, dtype=torch.float32)
        n = num_averaged.float()
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    def _ema_update(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        """ema <- decay * ema + (1 - decay) * theta."""
        weight = 1 - self.decay_at(num_averaged.to(averaged[0].device))
        trainable = self._trainable()  # None: every tensor (the tensors were given without an averaged module)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point() and (trainable is None or a.data_ptr() in trainable)]
        if floats:
            a, c = zip(*floats)
            torch._foreach_lerp_(list(a), list(c), weight.to(a[0].dtype))

    def _trainable(self) -> set[int] | None:
        """Storage of the averaged copy's trainable parameters and buffers: frozen parameters (a ControlNet's
        locked base) are equal in both copies and stay out of the average. None when no averaged model is set up."""
        if self._average_model is None:
            return None
        module = self._average_model.module
        cached = getattr(self, "_trainable_ptrs", None)
        if cached is None or cached[0] is not module:
            ptrs = {p.data_ptr() for p in module.parameters() if p.requires_grad} | {b.data_ptr() for b in module.buffers()}
            self._trainable_ptrs = cached = (module, ptrs)
        return cached[1]

    def averaged_module(self) -> L.LightningModule | None:
        """The LightningModule holding the EMA weights (None before training set it up)."""
        return None if self._average_model is None else self._average_model.module


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module with EMA weights if an EMA callback runs, else the module itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.averaged_module() is not None:
            return cb.averaged_module()
    return pl_module


def check_sampler(sampler: Any, pl_module: L.LightningModule, key: str) -> None:
    """A callback's own sampler (a config or the partial Hydra built from it), checked against the model's schedule
    when training starts (e.g. its steps beyond the schedule's T) rather than when it first samples."""
    if sampler:
        if OmegaConf.is_config(sampler):  # the user's config (conf/callbacks), resolved as Hydra would
            sampler = OmegaConf.to_container(sampler, resolve=True)
        try:
            check_compatible(registry.build(sampler, "sampler", where=key) if isinstance(sampler, Mapping) else sampler, pl_module.schedule,
                             pl_module.denoiser.learn_sigma)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None


class SampleGrid(L.Callback):
    """Every `every_n_steps` and at the end of training, sample `num_samples` images with fixed seeds from the
    EMA weights, save `samples/step_XXXXXXX.png` in the run directory and send it to the loggers, with the
    network evaluations per image it took (`samples/nfe`). Points (toy data) are drawn as a scatter plot over the
    training data instead of a grid.

    The seeds are split over the ranks and the images gathered, so the grid is made once, in parallel, and is
    the same whatever the number of processes.

    `labels` (class-conditional models, classifier guidance): null, a list of class indices repeated over the
    samples, or "all" for one row per class. `guidance`: a guidance config (conf/guidance/) applied to the
    denoiser; it is built when training starts, so a missing classifier checkpoint stops the run at once.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        seed: int = 0,
        sampler: dict | None = None,
        nrow: int | None = None,
        dirname: str = "samples",
        display_scale: int = 1,
        labels: Any = None,
        guidance: Any = None,
    ):
        if num_samples < 1:
            raise ValueError(f"callbacks.samples.num_samples={num_samples} must be positive")
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.sampler, self.nrow, self.dirname, self.display_scale = sampler, nrow, dirname, display_scale
        self.labels, self.guidance = labels, guidance
        self._guidance = None
        self.last_path: Path | None = None
        self.last_nfe: int | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_sampler(self.sampler, pl_module, "callbacks.samples.sampler")
        if not self.guidance and self.labels is None:
            return
        if self.guidance and self.labels is None:
            raise ValueError("callbacks.samples.guidance needs callbacks.samples.labels (a list of classes or 'all')")
        self._guidance = guidance_lib.build(self.guidance) if self.guidance else None
        # Wrap once now: bad guidance settings or labels fail before any training step.
        denoiser = guidance_lib.apply(pl_module.denoiser, self._guidance)
        guidance_lib.resolve_labels(self.labels, self.num_samples, guidance_lib.num_classes_of(denoiser))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.make_grid(trainer, pl_module)

    def make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        module = ema_module(trainer, pl_module)
        world = trainer.world_size
        num_classes = guidance_lib.num_classes_of(guidance_lib.apply(module.denoiser, self._guidance))
        labels, per_row = guidance_lib.resolve_labels(self.labels, self.num_samples, num_classes)
        n = self.num_samples if labels is None else len(labels)
        index = rank_share(n, world, trainer.global_rank)
        seeds = [self.seed + i for i in index]
        cond = {} if labels is None else {"labels": [labels[i % n] for i in index], "guidance": self._guidance}
        images = self._sample(module, seeds, **cond)
        if world > 1:
            images = pl_module.all_gather(images).flatten(0, 1)
        self._save(trainer, images[:n], self.nrow or per_row)

    def _sample(self, module: L.LightningModule, seeds: list[int], **cond: Any) -> Tensor:
        """`module.sample` with this grid's sampler, counting the network evaluations per image (`last_nfe`: one
        batch per rank)."""
        calls, handle = count_nfe(module)
        try:
            return module.sample(seeds, sampler=self.sampler, **cond)
        finally:
            handle.remove()
            self.last_nfe = calls[0]

    @rank_zero_only
    def _save(self, trainer: L.Trainer, images: Tensor, nrow: int | None = None) -> None:
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:07d}.png"
        if images.ndim == 2:  # points (toy data): a scatter plot of the samples over the training data

            data = getattr(trainer.datamodule, "train_points", None)
            grid = save_scatter(images, path, data() if data else None, f"step {trainer.global_step}")
        else:
            grid = save_grid(images, path, nrow=nrow, display_scale=self.display_scale)
        self.last_path = path
        for logger in trainer.loggers:
            logger.log_metrics({"samples/nfe": float(self.last_nfe)}, step=trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)


class FID(L.Callback):
    """Every `every_n_steps` training steps, FID (via torch-fidelity's `inception-v3-compat`) of `num_samples`
    images sampled from the EMA weights with seeds seed, seed + 1, ... against the training split of the run's
    data module; logged as `val/fid`, so a ModelCheckpoint(monitor="val/fid", mode="min") can keep the best.

    Sampling is split over the ranks and gathered; rank 0 extracts the features and broadcasts the value. The
    reference features are cached on disk (see ddpm_lightning.metrics). The Inception weights and the reference
    are made ready when fitting starts, before any training step.
    """

    def __init__(
        self,
        every_n_steps: int = 10000,
        num_samples: int = 10000,
        seed: int = 0,
        sampler: dict | None = None,
        batch_size: int = 250,
        weights_path: str | None = None,
        feature: str = "2048",
        max_reference_images: int | None = None,
        cache_dir: str | None = None,
        inception_batch_size: int = 64,
    ):

        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"callbacks.fid: every_n_steps={every_n_steps} and batch_size={batch_size} must be positive and "
                f"num_samples={num_samples} at least 2"
            )
        self.features = features_for(["fid"], str(feature))
        self.every_n_steps, self.num_samples, self.seed, self.sampler = every_n_steps, num_samples, seed, sampler
        self.batch_size, self.weights_path, self.feature = batch_size, weights_path, str(feature)
        self.max_reference_images, self.cache_dir, self.inception_batch_size = max_reference_images, cache_dir, inception_batch_size
        self._scorer: M.Scorer | None = None
        self._last_step = -1
        self.history: dict[int, float] = {}  # global step -> FID

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_sampler(self.sampler, pl_module, "callbacks.fid.sampler")
        if stage == "fit" and trainer.is_global_zero:
            self._weights = resolve_inception_weights(self.weights_path, "callbacks.fid.weights_path")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Extractor and reference features before the first step, so a missing dataset fails early."""

        if trainer.is_global_zero and self._scorer is None:
            extractor = M.feature_extractor(self._weights, self.features, pl_module.device)
            reference, _ = M.datamodule_reference_features(
                trainer.datamodule, extractor, "train", self.max_reference_images, self.cache_dir,
                self.inception_batch_size, self.feature,
            )
            self._scorer = M.Scorer(extractor, reference, self.feature, self.inception_batch_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            fid = self.compute(trainer, pl_module)
            pl_module.log("val/fid", fid, on_step=True, on_epoch=False)

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        module = ema_module(trainer, pl_module)
        world = trainer.world_size
        seeds = [self.seed + i for i in rank_share(self.num_samples, world, trainer.global_rank)]
        images = torch.cat(
            [module.sample(seeds[a : a + self.batch_size], sampler=self.sampler) for a in range(0, len(seeds), self.batch_size)]
        )
        if world > 1:
            images = pl_module.all_gather(images).flatten(0, 1)
        fid = torch.tensor(0.0)
        if trainer.is_global_zero:
            fid = torch.tensor(self._scorer(to_uint8(images[: self.num_samples]), ["fid"], verbose=False)["fid"])
        fid = float(trainer.strategy.broadcast(fid))
        self.history[trainer.global_step] = fid
        return fid
