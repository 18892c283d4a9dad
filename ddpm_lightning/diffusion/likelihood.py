"""Likelihood in bits/dim: the DDPM variational bound and the probability-flow ODE.

Entry point: `bits_per_dim(model, data)` with a DiffusionModule (e.g. from `loading.load_model`) and a tensor
[N, C, H, W] in [-1, 1] or a DataLoader of such batches (or of (images, labels) tuples).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ddpm_lightning.batch import unpack
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.grids import time_range
from ddpm_lightning.diffusion.samplers.ddpm import (
    eps_and_v,
    p_mean_log_variance,
    posterior_mean,
)
from ddpm_lightning.diffusion.samplers.noise import PerSampleNoise
from ddpm_lightning.diffusion.samplers.score import dopri5, probability_flow
from ddpm_lightning.diffusion.schedules import expand_as
from ddpm_lightning.images import to_uint8

VLB_VARIANCES = ("fixed_large", "fixed_small", "learned")
TRACE_ESTIMATORS = ("rademacher", "gaussian", "exact")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def log_normal_mass(lower: Tensor, upper: Tensor) -> Tensor:
    """log (Phi(upper) - Phi(lower)) of the standard normal for lower < upper (-inf / +inf allowed), from log-CDFs
    alone: log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))) on the side of zero where the tail is small (b = upper,
    a = lower where lower < -upper; else reflected, b = -lower, a = -upper), so no bin underflows to 0 or is floored."""
    reflect = lower > -upper  # the bin lies more in the upper tail: use Phi(-l) - Phi(-u)
    a = torch.where(reflect, -upper, lower)
    b = torch.where(reflect, -lower, upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Ho et al. 2020 §3.3 eq. 13: log of the N(mean, e^{2 log_scale}) mass of the bin [x - 1/255, x + 1/255] of
    8-bit data in [-1, 1], the edge bins extended to -inf / +inf. Per element, in nats; every bin in log space
    (`log_normal_mass`, float64), exact however improbable."""
    dtype = torch.result_type(mean, log_scale)
    x, mean, log_scale = (v.double() for v in torch.broadcast_tensors(x, mean, log_scale))
    inv = (-log_scale).exp()
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), inv * (x - mean + 1 / 255))
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), inv * (x - mean - 1 / 255))
    return log_normal_mass(lower, upper).to(dtype)


def _flat_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def prior_kl(schedule, x0: Tensor) -> Tensor:
    """Ho et al. 2020 eq. 5, L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats."""
    t_last = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device, dtype=torch.long)
    mean = expand_as(schedule.alpha(t_last), x0) * x0
    logvar = expand_as(2 * schedule.sigma(t_last).log(), x0)
    return _flat_sum(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))).double()


def vlb_term(schedule, x0: Tensor, x_t: Tensor, t: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """One term of Ho et al. 2020 eq. 5 at per-example indices t, in nats: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
    N(mean, e^log_var)) where t > 1 (index > 0), the decoder L_0 = -log p(x_0 | x_1) of eq. 13 where t = 1."""
    log_var_q = expand_as(schedule.posterior_log_variance_clipped[t], x0)
    kl = _flat_sum(normal_kl(posterior_mean(schedule, t, x0, x_t), log_var_q, mean, log_var))
    decoder_nll = -_flat_sum(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return torch.where(t > 0, kl, decoder_nll)


@torch.no_grad()
def vlb_terms(
    denoiser: Denoiser,
    x0: Tensor,
    noise: PerSampleNoise,
    variance: str = "fixed_large",
    clip_denoised: bool = True,
) -> dict[str, Tensor]:
    """Ho et al. 2020 eq. 5, per example in nats: L_T = KL(q(x_T | x_0) || N(0, I)), L_{t-1} = KL(q(x_{t-1} | x_t,
    x_0) || p(x_{t-1} | x_t)) for t = 2..T at one x_t ~ q(x_t | x_0) each (summed as "L_1:T-1"), and the decoder
    L_0 = -log p(x_0 | x_1) of eq. 13. p's variance is beta_t ("fixed_large"), beta~_t ("fixed_small") or the
    network's (Nichol & Dhariwal 2021 eq. 15, "learned"); at t = 1 the fixed ones are beta~_2, as in the
    official code."""
    schedule = denoiser.schedule
    if not schedule.discrete:
        raise ValueError(
            f"the variational bound needs a discrete DDPM schedule (schedule=linear or cosine); {type(schedule).__name__}"
            " has none. Use the probability-flow ODE estimator (estimators=['ode'])."
        )
    if variance not in VLB_VARIANCES:
        raise ValueError(f"variance={variance!r} must be one of {VLB_VARIANCES}")
    T, B = schedule.T, x0.shape[0]
    L_T = prior_kl(schedule, x0)
    L_mid = torch.zeros(B, device=x0.device, dtype=torch.float64)
    L_0 = torch.zeros_like(L_mid)
    for i in reversed(range(T)):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        x_t = schedule.q_sample(x0, t, noise.randn_like(x0))
        eps, v = eps_and_v(denoiser, x_t, t, variance)
        mean, log_var, _ = p_mean_log_variance(denoiser, schedule, x_t, t, t, eps, v, variance, clip_denoised)
        term = vlb_term(schedule, x0, x_t, t, mean, log_var).double()
        if i > 0:
            L_mid += term
        else:
            L_0 = term
    return {"L_T": L_T, "L_1:T-1": L_mid, "L_0": L_0}


def divergence(f, x: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
    """(f(x), div_x f(x)) per example: Hutchinson's z^T (df/dx) z for a probe z (Grathwohl et al. 2019), or the
    exact trace, one backward pass per dimension, when probe is None."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x)
        if probe is not None:
            (g,) = torch.autograd.grad(fx, x, probe)
            return fx.detach(), _flat_sum(g * probe)
        div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        flat = fx.flatten(1)
        for j in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j + 1 < flat.shape[1])
            div = div + g.flatten(1)[:, j]
        return fx.detach(), div


def ode_logp(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    trace: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **cond,
) -> tuple[Tensor, int]:
    """Song et al. 2021 App. D.2, eq. 40: log p_0(x) = log p_T(x(T)) + int_{t_min}^T div f~(x(t), t) dt along the
    probability-flow ODE f~ from t_min to T (adaptive RK45), with one fixed Hutchinson probe per example.
    Returns log p per example (nats) and the number of network evaluations."""
    schedule = denoiser.schedule
    if not schedule.has_sde:
        raise ValueError(
            f"the ODE likelihood needs a schedule with an SDE (linear, cosine, vp_sde, subvp_sde, ve_sde); "
            f"{type(schedule).__name__} has none"
        )
    if trace not in TRACE_ESTIMATORS:
        raise ValueError(f"trace={trace!r} must be one of {TRACE_ESTIMATORS}")
    shape, d = x.shape, x[0].numel()
    probe = None
    if trace != "exact":
        probe = noise.randn_like(x)
        if trace == "rademacher":
            probe = probe.sign()

    def f(y: Tensor, t: Tensor) -> Tensor:
        xt = y[:, :d].reshape(shape).to(x.dtype)
        drift, div = divergence(lambda z: probability_flow(denoiser, z, t, **cond), xt, probe)
        return torch.cat([drift.flatten(1), div[:, None]], 1).to(y.dtype)

    t_end, t_min = time_range(schedule)
    y0 = torch.cat([x.flatten(1), torch.zeros_like(x.flatten(1)[:, :1])], 1)
    y1, nfe = dopri5(f, y0, t_min, t_end, rtol, atol)
    return schedule.prior_logp(y1[:, :d].reshape(shape)) + y1[:, d].double(), nfe


def _batches(data: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
        return
    for batch in data:
        yield unpack(batch)["x"]


def bits_per_dim(
    model,
    data: Tensor | Iterable,
    estimators: Sequence[str] = ("vlb", "ode"),
    seed: int = 0,
    batch_size: int = 256,
    vlb_variance: str | None = None,
    trace: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict[str, float]:
    """Bits/dim of 8-bit test images `data` (in [-1, 1]) under a DiffusionModule, averaged over the images:

    - "vlb/bpd" with its terms "vlb/L_T", "vlb/L_1:T-1", "vlb/L_0" (Ho et al. eq. 5, discretised decoder; a
      bound on the discrete data's NLL; T network evaluations per image), with the reverse variances
      `vlb_variance` (None: the model's learned ones if it learns them, else the fixed ones it was trained with,
      module.vlb_variance, fixed_large unless set);
    - "ode/bpd" (Song et al. App. D: uniform dequantisation (k + u) / 128 - 1 of each 8-bit value k, exact
      log-density by the probability-flow ODE, plus 7 bits/dim for the change of scale from [-1, 1] to the
      256 levels), and "ode/nfe", the mean number of network evaluations per batch.

    Image n of the data gets the random streams of seed + n, so results do not depend on batch_size."""
    for e in estimators:
        if e not in ("vlb", "ode"):
            raise ValueError(f"estimators={list(estimators)}: each must be 'vlb' or 'ode'")
    denoiser, device = model.denoiser, model.device
    if vlb_variance is None:
        vlb_variance = "learned" if denoiser.learn_sigma else getattr(model, "hparams", {}).get("vlb_variance", "fixed_large")
    sums: dict[str, float] = {}
    n = nfe_total = batches = 0
    was_training = model.training
    model.eval()
    try:
        for x in _batches(data, batch_size):
            x = x.to(device)
            if tuple(x.shape[1:]) != tuple(model.image_shape):
                raise ValueError(f"data images have shape {tuple(x.shape[1:])}, the model expects {model.image_shape}")
            seeds = range(seed + n, seed + n + x.shape[0])
            bits, nfe = _batch_bits(denoiser, x, seeds, estimators, vlb_variance, trace, rtol, atol)
            for name, v in bits.items():
                sums[name] = sums.get(name, 0.0) + v
            nfe_total += nfe
            n += x.shape[0]
            batches += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("bits_per_dim got no images")
    out = {k: v / n for k, v in sums.items()}
    if "ode" in estimators:
        out["ode/nfe"] = nfe_total / batches
    return out


def _batch_bits(denoiser, x: Tensor, seeds: range, estimators: Sequence[str], vlb_variance: str, trace: str,
                rtol: float, atol: float) -> tuple[dict[str, float], int]:
    """The summed bits/dim of one batch under each estimator of `bits_per_dim`, and the ODE's evaluations."""
    k = to_uint8(x).float()
    x = k / 127.5 - 1  # exactly on the 8-bit grid
    dims = x[0].numel() * math.log(2)
    sums, nfe = {}, 0
    if "vlb" in estimators:
        terms = vlb_terms(denoiser, x, PerSampleNoise(seeds, x.device), vlb_variance)
        sums = {f"vlb/{name}": (v / dims).sum().item() for name, v in terms.items()}
        sums["vlb/bpd"] = (sum(terms.values()) / dims).sum().item()
    if "ode" in estimators:
        noise = PerSampleNoise(seeds, x.device)
        x_deq = (k + _uniform(noise, x)) / 128 - 1
        logp, nfe = ode_logp(denoiser, x_deq, noise, trace, rtol, atol)
        sums["ode/bpd"] = (-logp / dims + 7).sum().item()
    return sums, nfe


def _uniform(noise: PerSampleNoise, x: Tensor) -> Tensor:
    """U(0, 1) per sample from each sample's stream."""
    return torch.stack([torch.rand(tuple(x.shape[1:]), generator=g, device=noise.device) for g in noise.generators]).to(x.dtype)
