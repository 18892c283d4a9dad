"""The LightningModule: network + schedule + loss + optimiser, and sampling from them."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor

from ddpm_lightning import registry
from ddpm_lightning.batch import unpack
from ddpm_lightning.diffusion import guidance as guidance_lib
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.losses import (
    LOSSES,
    LossAwareTimesteps,
    check_vlb_variance,
    diffusion_losses,
    eps_mse,
)
from ddpm_lightning.diffusion.samplers import PerSampleNoise, check_compatible
from ddpm_lightning.diffusion.weighting import check_weighting
from ddpm_lightning.runs import correct_epoch_after_resume
from ddpm_lightning.seeds import step_seed


def _plain(cfg: Any) -> Any:
    """A config node as plain Python containers (what goes into the checkpoint's hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


LR_DECAYS = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup: int, decay: str = "constant", total: int | None = None) -> float:
    """The learning rate at optimiser step `step` as a fraction of the configured one: a linear warm-up over
    `warmup` steps (Ho et al. 2020, App. B), then constant, or a half cosine (Loshchilov & Hutter 2017, eq. 5 with
    eta_min = 0 and no restart) or a straight line down to zero at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


class ImageModule(L.LightningModule):
    """What the diffusion and classifier modules share: the shape of an example and the optimiser with linear
    warm-up (and, for the diffusion module, a decay of the learning rate to zero at the last step)."""

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example: `data_shape` where set (points, e.g. (2,) for the toy data), else the image
        shape (channels, image_size, image_size)."""
        shape = self.hparams.get("data_shape")
        if shape is not None:
            return tuple(shape)
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    image_shape = data_shape  # the name image code uses

    def configure_optimizers(self) -> dict:
        # Only the parameters that train (a ControlNet's locked base is left out).
        optimizer = registry.build(_plain(self.hparams.optimizer), "optimizer")(params=[p for p in self.parameters() if p.requires_grad])
        warmup, decay = self.hparams.warmup_steps, self.hparams.get("lr_decay", "constant")
        total = None  # the trainer's, read only for a decay (tests build the optimiser without a trainer)
        if decay != "constant":
            total = self.trainer.max_steps
            if not warmup < total:
                raise ValueError(f"module.lr_decay={decay} decays to zero at trainer.max_steps, which must be set and "
                                 f"exceed module.warmup_steps={warmup} (trainer.max_steps={total})")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, decay, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as configured (trainer.gradient_clip_val). Without a loss scaler (fp32, bf16-mixed) the gradients
        are already unscaled, so clip them here: Lightning's mixed-precision plugin refuses clipping for any
        optimizer that can unscale internally (fused Adam) even when no scaler exists."""
        if not gradient_clip_val or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def on_train_start(self) -> None:
        correct_epoch_after_resume(self.trainer)
        for optimizer in self.trainer.optimizers:
            match_state_layout(optimizer)


def _check_data_shape(data_shape: Any, image_size: int | None, channels: int | None) -> list[int] | None:
    """data_shape as a list of positive ints, or None for images, which then need image_size and channels."""
    if data_shape is None:
        if image_size is None or channels is None:
            raise ValueError(
                "module.image_size and module.channels (from data.image_size, data.channels) are needed for images; "
                "for points set data.data_shape (e.g. data=toy2d, which sets [2])"
            )
        return None
    shape = list(data_shape) if isinstance(data_shape, (list, tuple)) else None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"module.data_shape={data_shape!r} must be a list of positive integers, e.g. [2]")
    return shape


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor its parameter's memory layout. Fused Adam steps parameter, gradient and
    state element by element in memory order, so a state restored from a checkpoint of the other
    `module.channels_last` would be mis-stepped silently."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def count_nfe(module: L.LightningModule):
    """A forward hook counting the network evaluations; returns (counter list, handle)."""
    calls = [0]
    handle = module.net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


TIMESTEP_SAMPLERS = ("uniform", "loss_aware")


class DiffusionModule(ImageModule):
    """Trains a network under its preconditioning (`parameterization`: eps, x0, v, EDM, flow matching) with
    L_simple (Ho et al. 2020 Algorithm 1) or the objective's own loss, weighted over noise levels by `weighting`
    (uniform, min-SNR, soft-min-SNR), or with learned variances on the bound L_vlb or the hybrid loss (Nichol &
    Dhariwal 2021, `loss`), and samples from it.

    The network, schedule, sampler and optimiser arrive as Hydra configs (`_target_` dicts), so the
    checkpoint's hyperparameters hold plain configs, never modules, and `load_from_checkpoint`
    rebuilds the model in one call.
    """

    def __init__(
        self,
        net: Mapping,
        schedule: Mapping,
        sampler: Mapping,
        optimizer: Mapping,
        image_size: int | None,
        channels: int | None,
        warmup_steps: int = 5000,
        lr_decay: str = "constant",
        parameterization: str = "eps",
        channels_last: bool = True,
        compile: bool = False,
        seed: int | None = None,
        p_uncond: float = 0.1,
        data_shape: Sequence[int] | None = None,
        loss: str = "simple",
        hybrid_lambda: float = 0.001,
        timestep_sampler: str = "uniform",
        timestep_history: int = 10,
        vlb_variance: str = "fixed_large",
        weighting: str = "uniform",
        snr_gamma: float = 5.0,
    ):
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments, as given
        super().__init__()
        net, schedule, sampler, optimizer, data_shape = (_plain(c) for c in (net, schedule, sampler, optimizer, data_shape))
        data_shape = _check_data_shape(data_shape, image_size, channels)
        _check_labels_and_warmup(net, p_uncond, warmup_steps, lr_decay)
        learn_sigma = bool(net.get("learn_sigma", False))
        _check_loss(loss, hybrid_lambda, timestep_sampler, learn_sigma, vlb_variance, weighting, snr_gamma)
        # plain containers in the checkpoint: never modules, never OmegaConf nodes
        self.save_hyperparameters({**hparams, "net": net, "schedule": schedule, "sampler": sampler, "optimizer": optimizer,
                                   "data_shape": data_shape})
        self.net = registry.build(net, "net", where="module.net")
        self.schedule = registry.build(schedule, "schedule", where="module.schedule")
        self.sampler: Callable = registry.build(sampler, "sampler", where="module.sampler")
        if learn_sigma and not self.schedule.discrete:
            raise ValueError(
                f"model.learn_sigma=true interpolates between beta_t and beta~_t of a discrete DDPM schedule "
                f"(schedule=linear or cosine); {type(self.schedule).__name__} has none"
            )
        if loss == "vlb" and not self.schedule.discrete:
            raise ValueError(
                f"module.loss=vlb is the variational bound of a discrete DDPM schedule (schedule=linear, cosine or "
                f"scaled_linear); {type(self.schedule).__name__} has none. Use module.loss=simple"
            )
        # an invalid schedule/sampler pair fails before training
        check_compatible(self.sampler, self.schedule, learn_sigma)
        self.denoiser = Denoiser(self.net, self.schedule, parameterization, learn_sigma)
        self.timestep_sampler = LossAwareTimesteps(self.schedule.T, timestep_history) if timestep_sampler == "loss_aware" else None
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            # torch.compile in place (parameter names, hence checkpoints, unchanged); where compiling fails
            # (e.g. no C++ compiler) dynamo falls back to eager with a warning instead of stopping the run.
            torch._dynamo.config.suppress_errors = True
            self.net.compile()
        self._last_step_time: float | None = None
        self._step_noise: torch.Generator | None = None

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """eps_theta(x_t, t)."""
        return self.denoiser.eps(x, t, **cond)

    def setup(self, stage: str) -> None:
        """Refuse a data module whose examples have another shape than the model's (toy data declare theirs)."""
        shape = getattr(getattr(self.trainer, "datamodule", None), "data_shape", None)
        if shape is not None and tuple(shape) != self.data_shape:
            raise ValueError(
                f"the data's examples have shape {tuple(shape)} (data.data_shape) but the model is built for "
                f"{self.data_shape} (module.data_shape, or data.channels and data.image_size for images)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With a `seed`, every training batch's randomness is a function of (seed, epoch, batch index): the
        loss's t and eps come from a generator shared by all ranks (drawn for the global batch, each rank
        taking its slice, see `_loss`), the rest (e.g. dropout) from the global RNG reseeded per rank. A run
        resumed from a checkpoint therefore draws exactly what the uninterrupted run draws, and the noise of
        a global batch does not depend on how many processes share it."""
        if self.hparams.get("seed") is None:
            return
        key = (self.hparams.seed, self.current_epoch, batch_idx)
        self._step_noise = torch.Generator(self.device).manual_seed(step_seed(*key))
        torch.manual_seed(step_seed(*key, self.global_rank + 1))

    def _conditions(self, batch: dict, p_uncond: float = 0.0) -> dict:
        """The network's conditions from an unpacked batch: {"y": labels} for a class-conditional net, each replaced
        by the null label with probability p_uncond (classifier-free guidance training, Ho & Salimans 2022); {}
        for an unconditional one."""
        num_classes = getattr(self.net, "num_classes", None)
        if not num_classes:
            return {}
        if batch["y"] is None:
            raise ValueError("model.num_classes is set but the data yields no labels (use a labelled data module)")
        return {"y": guidance_lib.drop_labels(batch["y"], p_uncond, num_classes) if p_uncond else batch["y"]}

    def _loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """The per-example losses (`diffusion_losses`, weighted by 1 / (T p_t) with the loss-aware timestep
        sampler) and the t drawn."""
        batch = unpack(batch)
        x0 = batch["x"]
        if self.hparams.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond = self._conditions(batch, self.hparams.get("p_uncond", 0.0))
        # Rank r of w holds examples [r n, (r + 1) n) of the global batch; with per-step seeds, draw for all w n
        # from the shared generator and keep its slice.
        g = self._step_noise
        n, world, rank = x0.shape[0], 1, 0
        if g is not None:
            world, rank = self.trainer.world_size, self.global_rank
        part = slice(rank * n, (rank + 1) * n)
        weights = None
        if self.timestep_sampler is None:
            t = self.schedule.sample_t(world * n, x0.device, g)[part]
        else:
            t, weights = (v[part] for v in self.timestep_sampler.sample(world * n, x0.device, g))
        eps = torch.randn((world * n, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=g)[part]
        hp = self.hparams
        losses = diffusion_losses(self.denoiser, x0, t, eps, hp.get("loss", "simple"), hp.get("hybrid_lambda", 0.001),
                                  hp.get("vlb_variance", "fixed_large"), hp.get("weighting", "uniform"), hp.get("snr_gamma", 5.0),
                                  **cond)
        if self.timestep_sampler is not None:
            self._update_timesteps(t, losses["loss"].detach())
            losses["loss"] = losses["loss"] * weights
        return losses, t

    def _update_timesteps(self, t: Tensor, losses: Tensor) -> None:
        """Every rank adds the whole global batch's losses to the loss-aware sampler's history, in rank order."""
        if self.trainer.world_size > 1:
            t, losses = self.all_gather(t).flatten(), self.all_gather(losses).flatten()
        self.timestep_sampler.update(t.cpu(), losses.cpu())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.timestep_sampler is not None:  # the loss-aware sampler's history: a resumed run draws the same t
            checkpoint["loss_aware_timesteps"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.timestep_sampler is not None and "loss_aware_timesteps" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["loss_aware_timesteps"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, t = self._loss(batch)
        losses = terms["loss"]
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        if "vlb" in terms:
            self.log("train/mse", terms["mse"].mean())
            self.log("train/vlb", terms["vlb"].mean())
        # Loss by quartile of t: where in the chain the network is still poor.
        quartile = (4 * t.float() / max(getattr(self.schedule, "T", 1), 1)).long().clamp(max=3)
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            for q in range(4):
                mask = quartile == q
                if mask.any():
                    self.log(f"train/loss_q{q}", losses[mask].mean())
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/images_per_sec", losses.shape[0] / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # A fixed generator per batch makes the validation loss comparable across evaluations.
        g = torch.Generator(self.device).manual_seed(batch_idx)
        batch = unpack(batch)
        hp = self.hparams
        losses, _ = eps_mse(self.denoiser, batch["x"], generator=g, weighting=hp.get("weighting", "uniform"),
                            snr_gamma=hp.get("snr_gamma", 5.0), **self._conditions(batch))
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int],
        sampler: Callable | Mapping | None = None,
        callback: Callable | None = None,
        labels: Sequence[int] | Tensor | None = None,
        guidance: Any = None,
        edit: Any = None,
        **cond,
    ) -> Tensor:
        """Samples in [-1, 1] (images, or points for data_shape), one per seed; the sample for a seed does not depend
        on the batch it is in.

        `labels`: one class per seed (class-conditional models or classifier guidance). `guidance`: a callable
        wrapping the denoiser (see ddpm_lightning.diffusion.guidance), its Hydra config, or a list of them. `edit`:
        an edit of given images instead of sampling from scratch (ddpm_lightning.diffusion.editing: `Inpaint`,
        `SDEdit`), checked against the model and the sampler before any compute."""
        sampler = self.sampler if sampler is None else sampler
        if isinstance(sampler, Mapping):
            sampler = registry.build(_plain(sampler), "sampler")
        check_compatible(sampler, self.schedule, self.denoiser.learn_sigma)
        if edit is not None:
            edit.check(sampler, self.schedule, self.data_shape, len(seeds))
        denoiser = guidance_lib.apply(self.denoiser, guidance_lib.build(guidance))
        if labels is not None:
            y = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels, dtype=torch.long, device=self.device)
            if y.shape != (len(seeds),):
                raise ValueError(f"labels: {tuple(y.shape)} labels for {len(seeds)} seeds; give one label per sample")
            guidance_lib.check_labels(y, guidance_lib.num_classes_of(denoiser))
            cond["y"] = y
        noise = PerSampleNoise(seeds, self.device)
        was_training = self.training
        self.eval()
        try:
            with getattr(self.net, "sampling_context", contextlib.nullcontext)():  # a speed plug-in's, if any
                if edit is not None:
                    return edit(sampler, denoiser, noise, self.data_shape, callback=callback, **cond).clamp(-1, 1)
                x_T = noise.randn(self.data_shape) * self.schedule.prior_std()
                return sampler(denoiser, x_T, noise, callback=callback, **cond).clamp(-1, 1)
        finally:
            self.train(was_training)


def _check_labels_and_warmup(net: dict, p_uncond: float, warmup_steps: int, lr_decay: str = "constant") -> None:
    """Refuse a learning-rate or label-dropout setting that cannot train, naming the config keys."""
    if warmup_steps < 0:
        raise ValueError(f"module.warmup_steps={warmup_steps} must be non-negative")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"module.lr_decay={lr_decay!r} must be one of {LR_DECAYS}")
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"module.p_uncond={p_uncond} must lie in [0, 1]")
    if net.get("num_classes") and net.get("null_label", True) is False and p_uncond > 0:
        raise ValueError(
            f"module.p_uncond={p_uncond}: the model has no null label to drop labels to (model.null_label=false); "
            "set module.p_uncond=0"
        )


def _check_loss(loss: str, hybrid_lambda: float, timestep_sampler: str, learn_sigma: bool,
                vlb_variance: str = "fixed_large", weighting: str = "uniform", snr_gamma: float = 5.0) -> None:
    """Refuse a loss setting that cannot train, naming the config keys."""
    if loss not in LOSSES:
        raise ValueError(f"module.loss={loss!r} must be one of {LOSSES}")
    check_weighting(weighting, snr_gamma)
    if weighting != "uniform" and loss != "simple":
        raise ValueError(f"module.weighting={weighting} weights L_simple; module.loss={loss} has its own weights (use module.loss=simple)")
    if loss == "hybrid" and not learn_sigma:
        raise ValueError(
            "module.loss=hybrid trains the reverse variances (Nichol & Dhariwal 2021): set model.learn_sigma=true, "
            "or use module.loss=simple, or module.loss=vlb (the bound with module.vlb_variance fixed)"
        )
    if loss == "vlb" and not learn_sigma:
        check_vlb_variance(vlb_variance)
    if hybrid_lambda < 0:
        raise ValueError(f"module.hybrid_lambda={hybrid_lambda} must be non-negative")
    if timestep_sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"module.timestep_sampler={timestep_sampler!r} must be one of {TIMESTEP_SAMPLERS}")
    if timestep_sampler == "loss_aware" and loss != "vlb":
        raise ValueError(
            f"module.timestep_sampler=loss_aware importance-samples t for L_vlb (Nichol & Dhariwal 2021 §3.3); "
            f"it needs module.loss=vlb, not {loss}"
        )
