"""The model wrapper: the one place that knows the network's parameterisation.

Samplers, losses and guidance only ever ask a `Denoiser` for eps, x_0 or the score
at (x_t, t); the schedule supplies alpha(t) and sigma(t) of x_t = alpha x_0 + sigma eps.
A network trained with learned variances (`learn_sigma`, Nichol & Dhariwal 2021 §3.1) outputs twice the
image's channels: the first half is read as eps, x_0 or v as usual, the second half as the variance
interpolation v of `interpolated_log_variance`; `eps_and_v` returns both from one network evaluation.
"""

from __future__ import annotations

from torch import Tensor, nn

from ddpm_lightning.diffusion.schedules import expand_as

PARAMETERIZATIONS = ("eps", "x0", "v")


def interpolated_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 15: log Sigma_theta = v log beta_t + (1 - v) log beta~_t."""
    return v * log_beta + (1 - v) * log_beta_tilde


class Denoiser:
    """Turns a network's output into eps, x_0 and the score (Kingma et al. 2021; Salimans & Ho 2022 for v)."""

    def __init__(self, net: nn.Module, schedule: nn.Module, parameterization: str = "eps", learn_sigma: bool = False):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"module.parameterization={parameterization!r} must be one of {PARAMETERIZATIONS}")
        self.net, self.schedule, self.parameterization = net, schedule, parameterization
        self.learn_sigma = bool(learn_sigma)

    def eps_and_v(self, x: Tensor, t: Tensor, **cond) -> tuple[Tensor, Tensor | None]:
        """The noise estimate eps_theta(x_t, t) and, for a learned-variance network, the interpolation v of
        Nichol & Dhariwal eq. 15 (None otherwise), from one network evaluation. The network's second half is
        mapped to v = (out + 1) / 2, as in Nichol & Dhariwal's code, so a zero output is the geometric mean
        of beta_t and beta~_t."""
        out = self.net(x, self.schedule.net_label(t), **cond).to(x.dtype)
        v = None
        if self.learn_sigma:
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"model.learn_sigma=true needs a network with {2 * x.shape[1]} output channels; it gave {out.shape[1]}"
                )
            out, v = out.chunk(2, dim=1)
            v = (v + 1) / 2
        if self.parameterization == "eps":
            return out, v
        alpha, sigma = expand_as(self.schedule.alpha(t), x), expand_as(self.schedule.sigma(t), x)
        if self.parameterization == "x0":
            return (x - alpha * out) / sigma, v
        return self.eps_from_v(x, alpha, sigma, out), v

    def eps(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """The noise estimate eps_theta(x_t, t)."""
        return self.eps_and_v(x, t, **cond)[0]

    @staticmethod
    def eps_from_v(x: Tensor, alpha: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        """eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2) for v = alpha eps - sigma x_0 (Salimans & Ho 2022 §4,
        eq. of Appendix D, written for any schedule: alpha^2 + sigma^2 is 1 only for variance-preserving ones; VE,
        NCSN and sub-VP have alpha^2 + sigma^2 > 1)."""
        return (sigma * x + alpha * v) / (alpha**2 + sigma**2)

    def x0(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """Tweedie's estimate x_0 = (x_t - sigma eps) / alpha."""
        return self.x0_from_eps(x, t, self.eps(x, t, **cond))

    def x0_from_eps(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sigma(t) eps) / alpha(t)."""
        return (x - expand_as(self.schedule.sigma(t), x) * eps) / expand_as(self.schedule.alpha(t), x)

    def score(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma(t) (Song et al. 2021, denoising score matching)."""
        return -self.eps(x, t, **cond) / expand_as(self.schedule.sigma(t), x)
