"""Training losses, written once for every schedule: L_simple, the variational bound L_vlb and the hybrid of the
two (Ho et al. 2020; Nichol & Dhariwal 2021), and the loss-aware timestep sampler for L_vlb."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.likelihood import vlb_term
from ddpm_lightning.diffusion.samplers.ddpm import p_mean_log_variance
from ddpm_lightning.diffusion.schedules import expand_as
from ddpm_lightning.diffusion.weighting import F_weight

LOSSES = ("simple", "vlb", "hybrid")


def eps_mse(
    denoiser: Denoiser,
    x0: Tensor,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
    **cond,
) -> tuple[Tensor, Tensor]:
    """Ho et al. 2020 Algorithm 1 / eq. 14 (L_simple): ||eps - eps_theta(alpha x_0 + sigma eps, t)||^2 (or the
    objective's own, weighted loss: `simple_loss`), t drawn per example from the schedule (unless given, as eps).
    Returns the per-example losses and the t used."""
    schedule = denoiser.schedule
    t = schedule.sample_t(x0.shape[0], x0.device, generator) if t is None else t
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator) if eps is None else eps
    x_t = schedule.q_sample(x0, t, eps)
    return simple_loss(denoiser, x0, x_t, t, eps, weighting, snr_gamma, **cond), t


def diffusion_losses(
    denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, loss: str = "simple", hybrid_lambda: float = 0.001,
    vlb_variance: str = "fixed_large", weighting: str = "uniform", snr_gamma: float = 5.0, **cond
) -> dict[str, Tensor]:
    """Per-example training losses at the given t and eps, from one network evaluation:

    - "mse": `simple_loss`: ||eps - eps_theta(x_t, t)||^2 averaged over dimensions (Ho et al. 2020 eq. 14,
      L_simple), or the objective's own loss on F (EDM, flow matching), weighted by `weighting` (weighting.py);
    - "vlb" (loss vlb or hybrid): T L_{t-1}, the one-step estimate of L_vlb = L_0 + ... + L_{T-1} (Ho et al. eq. 5;
      L_T has no parameters) in bits/dim, with the KL of Gaussians for t > 1 and the discretised decoder for t = 1.
      With learned variances p's variance is the network's (Nichol & Dhariwal 2021 eq. 15), and for "hybrid" the
      mean's gradient is stopped, so that L_vlb trains only the variance (§3.1). Without them ("vlb" only) it is
      `vlb_variance`, beta_t ("fixed_large") or beta~_t ("fixed_small"): Ho et al.'s "L, fixed isotropic Sigma"
      (Table 2), whose t > 1 terms are `vlb_eps_weights` times ||eps - eps_theta||^2 plus a constant (eq. 12);
    - "loss": mse ("simple"), vlb ("vlb") or mse + lambda vlb ("hybrid", Nichol & Dhariwal eq. 16)."""
    if loss not in LOSSES:
        raise ValueError(f"module.loss={loss!r} must be one of {LOSSES}")
    schedule = denoiser.schedule
    x_t = schedule.q_sample(x0, t, eps)
    if loss == "simple":
        mse = simple_loss(denoiser, x0, x_t, t, eps, weighting, snr_gamma, **cond)
        return {"mse": mse, "loss": mse}
    if getattr(denoiser, "learn_sigma", False):
        eps_hat, v = denoiser.eps_and_v(x_t, t, **cond)
        variance, v = "learned", v.float()
    elif loss == "vlb":
        check_vlb_variance(vlb_variance)
        eps_hat, v, variance = denoiser.eps(x_t, t, **cond), None, vlb_variance
    else:
        raise ValueError(f"module.loss={loss} trains learned variances: it needs model.learn_sigma=true")
    mse = (eps - eps_hat).float().pow(2).flatten(1).mean(1)
    mean_eps = eps_hat.detach() if loss == "hybrid" else eps_hat
    mean, log_var, _ = p_mean_log_variance(denoiser, schedule, x_t, t, t, mean_eps.float(), v, variance, False)
    vlb = schedule.T * vlb_term(schedule, x0.float(), x_t.float(), t, mean, log_var) / (x0[0].numel() * math.log(2))
    return {"mse": mse, "vlb": vlb, "loss": vlb if loss == "vlb" else mse + hybrid_lambda * vlb}


def simple_loss(denoiser: Denoiser, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, weighting: str = "uniform",
                snr_gamma: float = 5.0, **cond) -> Tensor:
    """The per-example regression loss, averaged over dimensions: Ho et al.'s ||eps - eps_theta||^2 for eps, x0 and
    v networks under `weighting` uniform; otherwise w ||F - target||^2 on the network's own output F, w = 1 for
    an objective with its own loss (EDM, flow matching) under uniform, else `weighting.F_weight`."""
    pre = denoiser.precond
    if weighting == "uniform" and not pre.own_loss:
        return (eps - denoiser.eps(x_t, t, **cond)).float().pow(2).flatten(1).mean(1)
    schedule = denoiser.schedule
    alpha, sigma = expand_as(schedule.alpha(t), x0), expand_as(schedule.sigma(t), x0)
    F, _ = denoiser.F_and_v(x_t, t, alpha, sigma, **cond)
    mse = (F - pre.target(x0, eps, alpha, sigma)).float().pow(2).flatten(1).mean(1)
    if weighting == "uniform":
        return mse
    return (F_weight(weighting, snr_gamma, pre, schedule.alpha(t), schedule.sigma(t)) * mse.double()).float()


VLB_FIXED_VARIANCES = ("fixed_large", "fixed_small")


def check_vlb_variance(vlb_variance: str) -> None:
    if vlb_variance not in VLB_FIXED_VARIANCES:
        raise ValueError(f"module.vlb_variance={vlb_variance!r} must be one of {VLB_FIXED_VARIANCES}")


def vlb_eps_weights(schedule, vlb_variance: str = "fixed_large") -> Tensor:
    """Ho et al. 2020 eq. 12: with p's variance fixed at sigma_t^2, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t
    (1 - abar_t)) ||eps - eps_theta||^2 + C for t > 1, per step index (float64); sigma_t^2 = beta_t ("fixed_large")
    or beta~_t ("fixed_small"). Index 0 (t = 1) is the decoder, not a weighted MSE: its entry is NaN."""
    check_vlb_variance(vlb_variance)
    betas = schedule.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    sigma2 = betas if vlb_variance == "fixed_large" else betas * (1 - abar_prev) / (1 - abar)
    w = betas**2 / (2 * sigma2 * (1 - betas) * (1 - abar))
    w[0] = math.nan
    return w


class LossAwareTimesteps:
    """Nichol & Dhariwal 2021 §3.3 eq. 18 (eq. 17 is the cosine schedule): importance sampling of t for L_vlb, p_t proportional to
    sqrt(E[L_t^2]) over the last `history` values of L_t seen at each step, uniform until every step has them;
    an example drawn with p_t is weighted 1 / (T p_t), so the loss stays an unbiased estimate of L_vlb. As in
    their code, a share `uniform_prob` of p is uniform, so no step is starved."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        if history < 1:
            raise ValueError(f"module.timestep_history={history} must be a positive integer")
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.values = torch.zeros(T, history, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.long)

    def probs(self) -> Tensor:
        """p_t of eq. 18 (uniform while some step has fewer than `history` values)."""
        if bool((self.counts < self.history).any()):
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = self.values.pow(2).mean(1).sqrt()
        return p / p.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n indices t ~ p and their weights 1 / (T p_t)."""
        p = self.probs().to(device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each example's loss to its step's history (first in, first out)."""
        for i, value in zip(t.tolist(), losses.detach().double().tolist()):
            if self.counts[i] < self.history:
                self.values[i, self.counts[i]] = value
                self.counts[i] += 1
            else:
                self.values[i] = torch.cat([self.values[i, 1:], self.values.new_tensor([value])])

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["values"].shape) != (self.T, self.history):
            raise ValueError(
                f"the checkpoint's timestep history has shape {tuple(state['values'].shape)}, expected {(self.T, self.history)}"
                " (schedule.T and module.timestep_history must match the checkpoint's)"
            )
        self.values, self.counts = state["values"].double().cpu().clone(), state["counts"].long().cpu().clone()
