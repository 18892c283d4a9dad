"""Training and sampling a ControlNet (Zhang et al. 2023) on top of a trained diffusion checkpoint.

`ControlNetModule` is a DiffusionModule whose network is a `ControlledUNet` (nets/controlnet.py): the base
model's network, schedule and image shape come from `base_ckpt`, its weights are loaded and locked, and the
condition (conf/control/) is computed on the fly from each batch's images. Loss, noise, EMA, checkpoints and
resume are DiffusionModule's. A checkpoint holds the base weights too (and the base checkpoint's path and
sha256 for the record), so `loading.load_model` rebuilds a model that samples in one call:
`model.sample(seeds, hint=..., conditioning_scale=1.0)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ddpm_lightning.benign_warnings import hide_locked_modules_notice
from ddpm_lightning.control.conditions import load_folder
from ddpm_lightning.loading import read_base
from ddpm_lightning.nets.controlnet import ControlledUNet, MultiControlledUNet
from ddpm_lightning.seeds import rank_share
from ddpm_lightning.training.callbacks import FID, SampleGrid, ema_module
from ddpm_lightning.training.module import DiffusionModule, _plain

log = logging.getLogger(__name__)


class ControlNetModule(DiffusionModule):
    """A DiffusionModule training only the control branch of a ControlledUNet built on `base_ckpt`.

    `condition`: a conf/control/ config (the operator making the condition from an image). `image_size` and
    `channels` (the data's) must be the base model's. `sampler` null uses the base run's sampler; `p_uncond`
    null keeps the base's label dropout (class-conditional bases, so classifier-free guidance still works)."""

    def __init__(
        self,
        base_ckpt: str | None,
        condition: Mapping | None,
        optimizer: Mapping,
        image_size: int,
        channels: int,
        sampler: Mapping | None = None,
        hint_widths: Sequence[int] = (16, 32),
        warmup_steps: int = 0,
        channels_last: bool = True,
        seed: int | None = None,
        p_uncond: float | None = None,
    ):
        if not condition:
            raise ValueError("module=controlnet needs a condition: control=lowres, edges or mask")
        hp, state, digest = read_base(base_ckpt)
        for key, value, theirs in (("data.image_size", image_size, hp["image_size"]), ("data.channels", channels, hp["channels"])):
            if value != theirs:
                raise ValueError(f"{key}={value} differs from the base model's {theirs} (base_ckpt={base_ckpt}); set {key}={theirs}")
        net = {
            "_target_": "ddpm_lightning.nets.controlnet.ControlledUNet",
            "_recursive_": False,
            "base": hp["net"],
            "condition": _plain(condition),
            "hint_widths": list(hint_widths),
            "base_ckpt": str(Path(base_ckpt).resolve()),
            "base_sha256": digest,
        }
        super().__init__(
            net=net, schedule=hp["schedule"], sampler=_plain(sampler) or hp["sampler"], optimizer=optimizer,
            image_size=image_size, channels=channels, warmup_steps=warmup_steps,
            parameterization=hp.get("parameterization", "eps"), channels_last=channels_last, seed=seed,
            p_uncond=hp.get("p_uncond", 0.1) if p_uncond is None else p_uncond,
            weighting=hp.get("weighting", "uniform"), snr_gamma=hp.get("snr_gamma", 5.0),
        )
        self.net.load_base(state, f"base_ckpt={base_ckpt}")

    def _conditions(self, batch: dict, p_uncond: float = 0.0) -> dict:
        """The labels (class-conditional bases) and the condition of the batch's images (`hint`): training draws
        random conditions (masks) from the global RNG, reseeded per step with `seed`; validation from a fixed seed."""
        cond = super()._conditions(batch, p_uncond)
        x0 = batch["x"]
        g = None if self.training else torch.Generator(x0.device).manual_seed(0)
        cond["hint"] = self.net.condition(x0, g)
        return cond

    def on_fit_start(self) -> None:
        for cb in self.trainer.callbacks:
            if isinstance(cb, SampleGrid) and not isinstance(cb, ControlSampleGrid):
                raise ValueError("a ControlNet samples under conditions: set callbacks.samples._target_=ddpm_lightning.control.module.ControlSampleGrid (as experiment=controlnet_digits does)")
            if isinstance(cb, FID):
                raise ValueError("callbacks=fid does not apply to a ControlNet run; evaluate its checkpoints with evaluate.py (it samples under conditions)")
        counts = self.net.parameter_counts()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info(
            "ControlNet: base %s parameters (locked, %s), control branch %s parameters (trainable, %.2fx the base)",
            f"{counts['base']:,}", self.net.base_ckpt, f"{counts['control']:,}", counts["control"] / counts["base"],
        )
        assert trainable == counts["control"], "only the control branch may train"
        hide_locked_modules_notice(sum(1 for _ in self.net.base.modules()))  # the locked base, in eval mode on purpose


def is_controlled(module: DiffusionModule) -> bool:
    """A ControlNet model, or several ControlNets over one base."""
    return isinstance(module.net, (ControlledUNet, MultiControlledUNet))


def condition_pairs(module: DiffusionModule, hints: Tensor, samples: Tensor) -> Tensor:
    """Condition and sample side by side: [N, 2, C, H, W] (flatten(0, 1) orders them condition_0, sample_0, ...)."""
    shown = module.net.condition.show(hints.to(samples.device, samples.dtype), samples.shape[1]).clamp(-1, 1)
    return torch.stack([shown, samples], 1)


def split_hints(module: DiffusionModule, images: Tensor, seeds: Sequence[int]) -> Tensor:
    """The conditions of `images` (one per seed), random ones (masks) drawn from each seed's own generator, so a
    seed's condition does not depend on its batch."""
    return condition_hints(module.net.condition, images, seeds)


def condition_hints(op: Any, images: Tensor, seeds: Sequence[int]) -> Tensor:
    """`split_hints` with the condition operator `op` itself."""
    return torch.cat([op(x[None], torch.Generator().manual_seed(int(s))) for x, s in zip(images, seeds)])


class ControlSampleGrid(SampleGrid):
    """SampleGrid for a ControlNet: the conditions of the first `num_samples` validation images next to samples
    drawn under them (pairs condition | sample, `pairs_per_row` pairs a row)."""

    def __init__(self, *args: Any, pairs_per_row: int = 4, conditioning_scale: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pairs_per_row, self.conditioning_scale = pairs_per_row, conditioning_scale

    def make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        module = ema_module(trainer, pl_module)
        dm = trainer.datamodule
        dataset = dm.val_set if dm.val_set is not None and len(dm.val_set) else dm.train_set
        n = self.num_samples
        world = trainer.world_size
        share = rank_share(n, world, trainer.global_rank)
        index = [i % len(dataset) for i in share]
        seeds = [self.seed + i for i in share]
        images = torch.stack([dataset[i][0] for i in index]).to(pl_module.device)
        hints = split_hints(module, images, seeds)
        samples = self._sample(module, seeds, hint=hints, conditioning_scale=self.conditioning_scale)
        pairs = condition_pairs(module, hints, samples)
        if world > 1:
            pairs = pl_module.all_gather(pairs).flatten(0, 1)
        self._save(trainer, pairs[:n].flatten(0, 1), 2 * self.pairs_per_row)


class EvalConditions:
    """The condition of each seed for evaluate.py (config `control`): image i (seed seed_offset + i) gets the
    condition of image i mod N of `split` of the checkpoint's data module, or of the i mod N-th file (sorted by
    name) of `folder`; `scale` is the conditioning_scale. Loaded at once, so a bad folder fails before sampling."""

    def __init__(self, cfg: Mapping, module: DiffusionModule, datamodule, seed_offset: int = 0, condition: Any = None):
        self.module, self.seed_offset = module, seed_offset
        self.condition = module.net.condition if condition is None else condition
        scale = cfg.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"control.scale={scale!r}: one ControlNet takes one number (a list is for control.ckpts)")
        self.scale = float(scale)
        self.images = self.hints = None
        if cfg.get("folder"):
            self.hints = load_folder(cfg["folder"], self.condition, module.hparams.channels, module.hparams.image_size)
            self.source = {"folder": str(cfg["folder"]), "conditions": len(self.hints)}
        else:
            split = cfg.get("split", "val")
            dm = datamodule()
            dm.setup("validate")
            dataset = getattr(dm, f"{split}_set", None)
            if dataset is None or not len(dataset):
                raise ValueError(f"control.split={split!r}: the data module has no (or an empty) {split}_set; use train or val")
            self.images = dataset
            self.source = {"split": split, "images": len(dataset)}

    def __call__(self, seeds: Sequence[int]) -> Tensor:
        index = [(int(s) - self.seed_offset) for s in seeds]
        if self.hints is not None:
            return self.hints[[i % len(self.hints) for i in index]]
        images = torch.stack([self.images[i % len(self.images)][0] for i in index])
        return condition_hints(self.condition, images, seeds)

    def adherence(self, samples: Tensor, seeds: Sequence[int]) -> float:
        """Mean over the samples of the condition operator's adherence error (see ddpm_lightning.control.conditions)."""
        return float(self.condition.adherence(samples, self(seeds)).mean())

    def metrics(self, samples: Tensor, seeds: Sequence[int]) -> dict[str, float]:
        return {"adherence": self.adherence(samples, seeds)}

    def describe(self) -> dict:
        """What metrics.json records under `control`."""
        return {**self.source, "scale": self.scale, "condition": type(self.condition).__name__}

    def shown(self, seeds: Sequence[int], samples: Tensor) -> Tensor:
        """[N, 2, C, H, W]: condition | sample, for the grid."""
        shown = self.condition.show(self(seeds).to(samples.device, samples.dtype), samples.shape[1]).clamp(-1, 1)
        return torch.stack([shown, samples], 1)


class MultiEvalConditions:
    """The conditions of several ControlNets over one base (`loading.load_controlnets`; evaluate.py
    `control.ckpts`): one `EvalConditions` per branch, ckpt_path's first. `control.folder`: null (every branch
    takes its condition from `control.split`) or a list with one entry per ControlNet (a folder, or null for the
    split); `control.scale`: one number for all or a list with one per ControlNet."""

    def __init__(self, cfg: Mapping, module: DiffusionModule, datamodule, seed_offset: int = 0):
        conditions = module.net.conditions
        n = len(conditions)
        folders = cfg.get("folder")
        if folders is None:
            folders = [None] * n
        elif isinstance(folders, str) or len(folders) != n:
            raise ValueError(f"control.folder={folders!r}: with {n} ControlNets give a list of {n} entries, a folder "
                             "of condition images or null (the condition of control.split) for each, ckpt_path's first")
        scales = module.net._scales(cfg.get("scale", 1.0))  # one per ControlNet, checked
        self.parts = [EvalConditions({**cfg, "folder": f, "scale": s}, module, datamodule, seed_offset, op)
                      for f, s, op in zip(folders, scales, conditions)]
        self.scale = scales
        self.source = {"controlnets": [p.source for p in self.parts]}

    def __call__(self, seeds: Sequence[int]) -> list[Tensor]:
        return [p(seeds) for p in self.parts]

    def metrics(self, samples: Tensor, seeds: Sequence[int]) -> dict[str, float]:
        """The adherence error of the samples to each ControlNet's condition: adherence/<i>_<condition>."""
        return {f"adherence/{i}_{type(p.condition).__name__.lower()}": p.adherence(samples, seeds) for i, p in enumerate(self.parts)}

    def describe(self) -> dict:
        return {**self.source, "scale": self.scale, "condition": [type(p.condition).__name__ for p in self.parts]}

    def shown(self, seeds: Sequence[int], samples: Tensor) -> Tensor:
        """[N, n + 1, C, H, W]: every condition, then the sample."""
        pairs = [p.shown(seeds, samples) for p in self.parts]
        return torch.cat([q[:, :1] for q in pairs] + [samples[:, None]], 1)


def eval_conditions(cfg: Mapping, module: DiffusionModule, datamodule, seed_offset: int = 0):
    """The evaluation conditions of a ControlNet model (`EvalConditions`) or of several (`MultiEvalConditions`)."""
    if isinstance(module.net, MultiControlledUNet):
        return MultiEvalConditions(cfg, module, datamodule, seed_offset)
    return EvalConditions(cfg, module, datamodule, seed_offset)
