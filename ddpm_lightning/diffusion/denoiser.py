"""The preconditioning: the one place that knows how the network's input and output relate to x_t, eps and x_0.

Karras et al. 2022 (EDM) Table 1 writes every model as a network F wrapped in four coefficients: c_in scales its
input, c_noise is its time label, c_skip and c_out mix x and F into the prediction. Here the prediction is eps at
x_t = alpha(t) x_0 + sigma(t) eps (the package's one network contract):

    eps_theta(x_t, t) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t; c_noise(t)).

A `Preconditioning` gives the four coefficients of one parameterisation (eps, x0, v); `Denoiser` applies them
and offers the views the samplers ask for: eps(x_t, t), x_0, the score, and Karras et al.'s D(x^; sigma) on the
noise level sigma = sigma(t) / alpha(t) of x^ = x_t / alpha(t). A new objective (EDM's c_skip = sigma_d^2 /
(sigma^2 + sigma_d^2), c_noise = ln(sigma) / 4; flow matching's velocity) is one new `Preconditioning` registered
in `PARAMETERIZATIONS`; no sampler changes.

A network trained with learned variances (`learn_sigma`, Nichol & Dhariwal 2021 §3.1) outputs twice the image's
channels: the first half is F as usual, the second half the variance interpolation v of
`interpolated_log_variance`; `eps_and_v` returns both from one network evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm_lightning.diffusion.schedules import expand_as


def interpolated_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 15: log Sigma_theta = v log beta_t + (1 - v) log beta~_t."""
    return v * log_beta + (1 - v) * log_beta_tilde


class Preconditioning:
    """Karras et al. 2022 Table 1's c_in, c_noise, c_skip and c_out, for the eps target at x_t (module docstring),
    as functions of the schedule's alpha(t) and sigma(t). The defaults: the network sees x_t itself (c_in = 1)
    and the schedule's time label (c_noise = `Schedule.net_label`, Ho et al.'s step index for DDPM)."""

    def c_in(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        """The network's input scale: F sees c_in x_t."""
        return 1.0

    def c_noise(self, schedule, t: Tensor) -> Tensor:
        """The network's time label at t."""
        return schedule.net_label(t)

    def c_skip(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        raise NotImplementedError

    def c_out(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        raise NotImplementedError

    def eps(self, x: Tensor, alpha: Tensor, sigma: Tensor, F: Tensor) -> Tensor:
        """eps_theta = c_skip x_t + c_out F (a subclass may group the same terms so as to round as before)."""
        return self.c_skip(alpha, sigma) * x + self.c_out(alpha, sigma) * F

    # Training: what F should output for (x_0, eps), and how an error in F moves the x_0 estimate.
    own_loss = False  # True: the objective's paper trains on ||F - target||^2; False: on Ho et al.'s eps error

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The regression target of F at x_t = alpha x_0 + sigma eps."""
        raise NotImplementedError

    def x0_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        """d x_0-estimate / d F, so that ||x_0 - x^_0||^2 = x0_scale^2 ||F - target||^2 (the loss weightings are
        written on the x_0 error, `weighting.py`)."""
        raise NotImplementedError


class EpsPrediction(Preconditioning):
    """Ho et al. 2020 eq. 11-12: the network predicts eps itself (c_skip = 0, c_out = 1)."""

    def c_skip(self, alpha, sigma):
        return 0.0

    def c_out(self, alpha, sigma):
        return 1.0

    def eps(self, x, alpha, sigma, F):
        """eps_theta = F."""
        return F

    def target(self, x0, eps, alpha, sigma):
        return eps

    def x0_scale(self, alpha, sigma):
        """x_0 = (x_t - sigma F) / alpha."""
        return -sigma / alpha


class X0Prediction(Preconditioning):
    """The network predicts x_0 (Kingma et al. 2021 §3.4): eps = (x_t - alpha F) / sigma, i.e. c_skip = 1 / sigma,
    c_out = -alpha / sigma."""

    def c_skip(self, alpha, sigma):
        return 1 / sigma

    def c_out(self, alpha, sigma):
        return -alpha / sigma

    def eps(self, x, alpha, sigma, F):
        """eps_theta = (x_t - alpha F) / sigma: c_skip x_t + c_out F with one rounding fewer."""
        return (x - alpha * F) / sigma

    def target(self, x0, eps, alpha, sigma):
        return x0

    def x0_scale(self, alpha, sigma):
        return 1.0


class VPrediction(Preconditioning):
    """Salimans & Ho 2022 §4 (eq. of Appendix D): the network predicts v = alpha eps - sigma x_0, so
    eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2): c_skip = sigma / (alpha^2 + sigma^2), c_out = alpha /
    (alpha^2 + sigma^2), for any schedule (alpha^2 + sigma^2 is 1 only for variance-preserving ones; VE, NCSN and
    sub-VP have alpha^2 + sigma^2 > 1)."""

    def c_skip(self, alpha, sigma):
        return sigma / (alpha**2 + sigma**2)

    def c_out(self, alpha, sigma):
        return alpha / (alpha**2 + sigma**2)

    def eps(self, x, alpha, sigma, F):
        """eps_theta = (sigma x_t + alpha F) / (alpha^2 + sigma^2): c_skip x_t + c_out F with one rounding fewer."""
        return (sigma * x + alpha * F) / (alpha**2 + sigma**2)

    def target(self, x0, eps, alpha, sigma):
        return alpha * eps - sigma * x0

    def x0_scale(self, alpha, sigma):
        """x_0 = (alpha x_t - sigma F) / (alpha^2 + sigma^2)."""
        return -sigma / (alpha**2 + sigma**2)


class EDMPreconditioning(Preconditioning):
    """Karras et al. 2022 Table 1 (EDM column), on the noise level s = sigma / alpha of x^ = x_t / alpha:
    D(x^; s) = c_skip^E x^ + c_out^E F(c_in^E x^; c_noise) with c_skip^E = sigma_d^2 / (s^2 + sigma_d^2),
    c_out^E = s sigma_d / sqrt(s^2 + sigma_d^2), c_in^E = 1 / sqrt(s^2 + sigma_d^2), c_noise = ln(s) / 4, sigma_d = 0.5.
    As an eps prediction (eps = (x^ - D) / s): c_skip = s^2 / ((s^2 + sigma_d^2) sigma), c_out = -sigma_d /
    sqrt(s^2 + sigma_d^2), and F sees c_in^E x_t / alpha. The loss lambda(s) ||D - x_0||^2 with lambda = (s^2 +
    sigma_d^2) / (s sigma_d)^2 (eq. 8) is ||F - target||^2 exactly (lambda c_out^E^2 = 1), hence `own_loss`."""

    own_loss = True

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def _root(self, alpha, sigma):
        """sqrt(s^2 + sigma_d^2) at s = sigma / alpha."""
        return ((sigma / alpha) ** 2 + self.sigma_data**2) ** 0.5

    def c_in(self, alpha, sigma):
        return 1 / (alpha * self._root(alpha, sigma))

    def c_noise(self, schedule, t):
        """ln(s) / 4."""
        return schedule.noise_level(t).log().float() / 4

    def c_skip(self, alpha, sigma):
        s = sigma / alpha
        return s**2 / ((s**2 + self.sigma_data**2) * sigma)

    def c_out(self, alpha, sigma):
        return -self.sigma_data / self._root(alpha, sigma)

    def target(self, x0, eps, alpha, sigma):
        """(x_0 - c_skip^E x^) / c_out^E = (s x_0 / sigma_d - sigma_d eps) / sqrt(s^2 + sigma_d^2)."""
        s = sigma / alpha
        return (s * x0 / self.sigma_data - self.sigma_data * eps) / self._root(alpha, sigma)

    def x0_scale(self, alpha, sigma):
        """c_out^E."""
        return (sigma / alpha) * self.sigma_data / self._root(alpha, sigma)


class FlowPrediction(Preconditioning):
    """Flow matching (Lipman et al. 2023 eq. 23; Liu et al. 2023): F predicts the velocity u = eps - x_0 of the
    straight path x_t = (1 - t) x_0 + t eps; on any schedule x_0 = eps - u gives eps = (x_t + alpha u) / (alpha +
    sigma): c_skip = 1 / (alpha + sigma), c_out = alpha / (alpha + sigma). Its loss is the velocity error
    ||F - (eps - x_0)||^2 (`own_loss`)."""

    own_loss = True

    def c_skip(self, alpha, sigma):
        return 1 / (alpha + sigma)

    def c_out(self, alpha, sigma):
        return alpha / (alpha + sigma)

    def eps(self, x, alpha, sigma, F):
        return (x + alpha * F) / (alpha + sigma)

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def x0_scale(self, alpha, sigma):
        """x_0 = eps - u = (x_t - sigma u) / (alpha + sigma)."""
        return -sigma / (alpha + sigma)


# `module.parameterization` -> its preconditioning; iterating gives the names.
PARAMETERIZATIONS = {"eps": EpsPrediction(), "x0": X0Prediction(), "v": VPrediction(), "edm": EDMPreconditioning(),
                     "flow": FlowPrediction()}


class Denoiser:
    """A network under its preconditioning (`PARAMETERIZATIONS`): eps, x_0, the score and Karras et al.'s D."""

    def __init__(self, net: nn.Module, schedule: nn.Module, parameterization: str = "eps", learn_sigma: bool = False):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"module.parameterization={parameterization!r} must be one of {tuple(PARAMETERIZATIONS)}")
        self.net, self.schedule, self.parameterization = net, schedule, parameterization
        self.learn_sigma = bool(learn_sigma)

    @property
    def precond(self) -> Preconditioning:
        """The coefficients of this denoiser's parameterisation."""
        return PARAMETERIZATIONS[self.parameterization]

    def c_noise(self, t: Tensor) -> Tensor:
        """The network's time label at t (Karras et al. Table 1's c_noise)."""
        return self.precond.c_noise(self.schedule, t)

    def eps_and_v(self, x: Tensor, t: Tensor, **cond) -> tuple[Tensor, Tensor | None]:
        """The noise estimate eps_theta(x_t, t) = c_skip x_t + c_out F(c_in x_t; c_noise) and, for a learned-variance
        network, the interpolation v of Nichol & Dhariwal eq. 15 (None otherwise), from one network evaluation.
        The network's second half is mapped to v = (out + 1) / 2, as in Nichol & Dhariwal's code, so a zero output
        is the geometric mean of beta_t and beta~_t."""
        alpha, sigma = expand_as(self.schedule.alpha(t), x), expand_as(self.schedule.sigma(t), x)
        out, v = self.F_and_v(x, t, alpha, sigma, **cond)
        return self.precond.eps(x, alpha, sigma, out), v

    def F_and_v(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, **cond) -> tuple[Tensor, Tensor | None]:
        """The network's output F(c_in x_t; c_noise) and, for a learned-variance network, v (`eps_and_v`)."""
        pre = self.precond
        out = self.net(pre.c_in(alpha, sigma) * x, pre.c_noise(self.schedule, t), **cond).to(x.dtype)
        v = None
        if self.learn_sigma:
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"model.learn_sigma=true needs a network with {2 * x.shape[1]} output channels; it gave {out.shape[1]}"
                )
            out, v = out.chunk(2, dim=1)
            v = (v + 1) / 2
        return out, v

    def eps(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """The noise estimate eps_theta(x_t, t)."""
        return self.eps_and_v(x, t, **cond)[0]

    @staticmethod
    def eps_from_v(x: Tensor, alpha: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        """eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2) for v = alpha eps - sigma x_0 (Salimans & Ho 2022 §4;
        `VPrediction`)."""
        return PARAMETERIZATIONS["v"].eps(x, alpha, sigma, v)

    def x0(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """Tweedie's estimate x_0 = (x_t - sigma eps) / alpha."""
        return self.x0_from_eps(x, t, self.eps(x, t, **cond))

    def x0_from_eps(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sigma(t) eps) / alpha(t) (Ho et al. 2020 eq. 4 solved for x_0)."""
        return (x - expand_as(self.schedule.sigma(t), x) * eps) / expand_as(self.schedule.alpha(t), x)

    def score(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma(t) (Song et al. 2021, denoising score matching)."""
        return -self.eps(x, t, **cond) / expand_as(self.schedule.sigma(t), x)

    def D(self, x_hat: Tensor, sigma: float, **cond) -> Tensor:
        """Karras et al. 2022's D(x^; sigma) of this denoiser (`D`)."""
        return D(self, x_hat, sigma, **cond)


def time_of_level(schedule, sigma: float, x: Tensor) -> Tensor:
    """The schedule's time t of noise level sigma = sigma(t) / alpha(t), as a [B] tensor for x [B, ...]."""
    return schedule.t_of_noise_level(torch.tensor(sigma, dtype=torch.float64, device=x.device)).expand(x.shape[0])


def scaling(schedule, sigma: float, x: Tensor) -> Tensor:
    """Karras et al. 2022 eq. 4's s(t) = alpha(t) at noise level sigma: x_t = s x^, broadcastable against x."""
    return expand_as(schedule.alpha(time_of_level(schedule, sigma, x)), x)


def D(denoiser, x_hat: Tensor, sigma: float, **cond) -> Tensor:
    """Karras et al. 2022 eq. 2 / Table 1's D(x^; sigma): the x_0 prediction at x_t = s x^, t = t(sigma), of any
    denoiser (an object with `schedule` and `x0(x_t, t)`: a `Denoiser`, a guidance wrapper, a test's oracle)."""
    t = time_of_level(denoiser.schedule, sigma, x_hat)
    return denoiser.x0(expand_as(denoiser.schedule.alpha(t), x_hat) * x_hat, t, **cond)
