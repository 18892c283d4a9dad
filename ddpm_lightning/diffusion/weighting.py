"""Loss weightings over noise levels, written on the x_0 error as Hang et al. 2023 do: the loss at t is
w(SNR) ||x_0 - x^_0||^2 with SNR = alpha(t)^2 / sigma(t)^2, whatever the network predicts. For a network F with
x^_0 moving as x0_scale dF (`Preconditioning.x0_scale`) the loss is w(SNR) x0_scale^2 ||F - target||^2, which is
Hang et al.'s weight for each parameterisation: min(SNR, gamma) / SNR on the eps error, min(SNR, gamma)
on the x_0 error, min(SNR, gamma) / (SNR + 1) on the v error of a variance-preserving schedule.

"uniform" is each objective's own loss: Ho et al.'s L_simple on the eps error for eps, x0 and v networks, the
paper's loss on F for EDM (Karras et al. eq. 8) and flow matching (the velocity error)."""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHTINGS = ("uniform", "min_snr", "soft_min_snr")


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """The signal-to-noise ratio alpha^2 / sigma^2 of x_t (Kingma et al. 2021 eq. 1)."""
    return (alpha / sigma) ** 2


def min_snr(snr: Tensor, gamma: float) -> Tensor:
    """Hang et al. 2023 (Min-SNR-gamma): min(SNR, gamma) on the x_0 error."""
    return snr.clamp(max=gamma)


def soft_min_snr(snr: Tensor, gamma: float) -> Tensor:
    """Crowson et al. 2024 (HDiT)'s soft-min-SNR, (SNR^-1 + gamma^-1)^-1 on the x_0 error: their 1 / (s^2 +
    sigma_d^2) at noise level s = SNR^(-1/2) with gamma = sigma_d^-2; it tends to SNR as SNR -> 0 and to gamma as
    SNR -> infinity, like min(SNR, gamma), without the kink."""
    return 1 / (1 / snr + 1 / gamma)


X0_WEIGHTS = {"min_snr": min_snr, "soft_min_snr": soft_min_snr}


def check_weighting(weighting: str, gamma: float) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"module.weighting={weighting!r} must be one of {WEIGHTINGS}")
    if not gamma > 0:
        raise ValueError(f"module.snr_gamma={gamma} must be positive (Hang et al. use 5)")


def F_weight(weighting: str, gamma: float, precond, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The weight on ||F - target||^2 of a non-uniform `weighting`: w(SNR) x0_scale^2, in float64 so that the
    product stays finite at the ends (SNR -> 0 or infinity)."""
    alpha, sigma = alpha.double(), sigma.double()
    scale = torch.as_tensor(precond.x0_scale(alpha, sigma), dtype=torch.float64)
    return X0_WEIGHTS[weighting](snr(alpha, sigma), gamma) * scale**2
