"""Guidance: wrappers that take a denoiser and return one with the same interface
(`eps_and_v`, `eps`, `x0`, `x0_from_eps`, `score`, `schedule`), so that every sampler can use them unchanged.
They stack: the denoiser a wrapper takes may itself be a wrapper. A wrapper guides eps and passes the inner
model's learned variance (Nichol & Dhariwal 2021) through unchanged.

- `ClassifierFree`: Ho & Salimans 2022, eps~ = (1 + w) eps(x, c) - w eps(x). Papers that write
  eps~ = s eps(x, c) + (1 - s) eps(x) use the "scale" s = 1 + w: w = 0 (s = 1) is the plain
  conditional model, w = -1 (s = 0) the unconditional one.
- `ClassifierGuidance`: Dhariwal & Nichol 2021 §4, in the eps form of their eq. 14 (Algorithm 2),
  eps~ = eps - scale sigma(t) grad_x log p(y | x_t), i.e. score~ = score + scale grad_x log p(y | x_t).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.schedules import expand_as


def num_classes_of(denoiser) -> int | None:
    """The number of classes a (possibly wrapped) denoiser can be conditioned on, or None."""
    k = getattr(denoiser, "num_classes", None)
    return k if k is not None else getattr(getattr(denoiser, "net", None), "num_classes", None)


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Ho & Salimans 2022 Algorithm 1: replace each label by the null label with probability p_uncond."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def resolve_labels(labels, n: int, num_classes: int | None) -> tuple[list[int] | None, int | None]:
    """Per-sample labels for n samples, and the grid's images per row.

    labels: None (no labels), "all" (one row of max(1, n // K) samples per class) or a list of class
    indices, repeated cyclically over the n samples."""
    if labels is None:
        return None, None
    if num_classes is None:
        raise ValueError(
            f"labels={labels!r} need a class-conditional model (model.num_classes) or classifier guidance"
        )
    if isinstance(labels, str):
        if labels != "all":
            raise ValueError(f"labels={labels!r} must be 'all', a list of class indices or null")
        per = max(1, n // num_classes)
        return [k for k in range(num_classes) for _ in range(per)], per
    for v in labels:  # before any compute: a label out of range would fail only at sampling, 1.5 would be read as 1
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes:
            raise ValueError(f"labels={list(labels)!r}: {v!r} is not a class index in [0, {num_classes - 1}] (the model's num_classes)")
    labels = list(labels)
    if not labels:
        raise ValueError("labels=[] is empty: give class indices, 'all' or null")
    return [labels[i % len(labels)] for i in range(n)], None


def check_labels(y: Tensor, num_classes: int | None) -> None:
    if num_classes is None:
        raise ValueError("labels given to a model without model.num_classes and without classifier guidance")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (the model's num_classes); got {y.unique().tolist()}")


def _double(v):
    """A per-example conditioning tensor (or a list of them: the conditions of several ControlNets) repeated for
    the second half of a doubled batch."""
    if isinstance(v, (list, tuple)):
        return type(v)(_double(e) for e in v)
    return torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 else v


class Guided(Denoiser):
    """Base of the guidance wrappers: the inner denoiser's schedule, x_0 and score derived from this eps."""

    def __init__(self, denoiser: Denoiser):
        self.inner, self.schedule = denoiser, denoiser.schedule
        self.net = getattr(denoiser, "net", None)
        self.parameterization = "eps"
        self.learn_sigma = getattr(denoiser, "learn_sigma", False)

    @property
    def num_classes(self) -> int | None:
        return num_classes_of(self.inner)


class ClassifierFree(Guided):
    """Ho & Salimans 2022 eq. 6: eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null), both halves in one batched
    forward pass; the unconditional half uses the null label (index num_classes)."""

    def __init__(self, denoiser: Denoiser, w: float = 1.0):
        super().__init__(denoiser)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"guidance.w={w!r} must be a finite number")
        if num_classes_of(denoiser) is None:
            raise ValueError("classifier-free guidance needs a class-conditional model: set model.num_classes")
        self.w = float(w)

    def eps_and_v(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond) -> tuple[Tensor, Tensor | None]:
        """The guided eps, and the conditional half's learned variance interpolation (None for fixed variances)."""
        if y is None:
            raise ValueError("classifier-free guidance needs labels (labels=[...] or labels=all)")
        t = t.expand(x.shape[0])
        null = torch.full_like(y, num_classes_of(self.inner))
        cond = {k: _double(v) for k, v in cond.items()}
        eps, v = self.inner.eps_and_v(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **cond)
        eps_c, eps_u = eps.chunk(2)
        return (1 + self.w) * eps_c - self.w * eps_u, None if v is None else v.chunk(2)[0]


class ClassifierGuidance(Guided):
    """Dhariwal & Nichol 2021 §4 (eq. 14, Algorithm 2): eps~ = eps - scale sigma(t) grad_x log p_phi(y | x_t, t).

    `classifier` is a network called as classifier(x_t, c_noise(t)) -> logits (a checkpoint written by
    `experiment=classifier_digits` is loaded by `ddpm_lightning.loading.classifier_guidance`). `conditional`: pass the labels on to the diffusion
    model too (None: whenever it is class-conditional); False guides its unconditional (null-label) output."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module, scale: float = 1.0, conditional: bool | None = None):
        super().__init__(denoiser)
        self.classifier, self.scale = classifier, float(scale)
        self.conditional = num_classes_of(denoiser) is not None if conditional is None else bool(conditional)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.classifier, "num_classes", None)

    def grad_log_prob(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """grad_x log p_phi(y | x_t, t), per example."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, self.c_noise(t.expand(x.shape[0])))
            log_p = F.log_softmax(logits.float(), -1).gather(1, y[:, None]).sum()
            return torch.autograd.grad(log_p, x_in)[0].to(x.dtype)

    def eps_and_v(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond) -> tuple[Tensor, Tensor | None]:
        """The guided eps, and the inner model's learned variance interpolation (None for fixed variances)."""
        if y is None:
            raise ValueError("classifier guidance needs labels (labels=[...] or labels=all)")
        eps, v = self.inner.eps_and_v(x, t, **({"y": y} if self.conditional else {}), **cond)
        sigma = expand_as(self.schedule.sigma(t.expand(x.shape[0])), x)
        return eps - self.scale * sigma * self.grad_log_prob(x, t, y), v


def build(guidance):
    """A guidance config (a `_partial_` node of conf/guidance/, or a list of them) as callables; callables pass."""

    is_cfg = isinstance(guidance, Mapping) or (
        isinstance(guidance, Sequence) and not isinstance(guidance, str) and any(isinstance(g, Mapping) for g in guidance)
    )
    if not is_cfg:
        return guidance
    if not isinstance(guidance, (dict, list)):
        guidance = OmegaConf.to_container(guidance, resolve=True)
    return instantiate(guidance)


def apply(denoiser: Denoiser, guidance) -> Denoiser:
    """Wrap a denoiser in one guidance callable (e.g. a Hydra partial of a class above) or a list of them,
    applied in order (the first wraps the model)."""
    if guidance is None:
        return denoiser
    for g in guidance if isinstance(guidance, Sequence) else [guidance]:
        denoiser = g(denoiser)
    return denoiser
