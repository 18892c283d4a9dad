"""Noise schedules: the forward process x_t = alpha(t) x_0 + sigma(t) eps.

Every method in the package (DDPM, NCSN, score SDEs) is a schedule of this form
(Song et al. 2021, score SDEs, §3.4: VP for DDPM, VE for NCSN; README "Score-based models"). A schedule is immutable: samplers pick time steps from it but
never change it. Its tensors are non-persistent buffers, so they follow the
module's device and never enter a checkpoint.

DDPM's discrete time uses 0-based indices: index i is the paper's t = i + 1.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from ddpm_lightning.diffusion.grids import (  # noqa: F401 - also re-exported under their old home
    DEFAULT_SPACING,
    DISCRETE_SPACINGS,
    NOISE_LEVEL_RANGE_SPACINGS,
    SPACING_ALIASES,
    check_spacing,
    discrete_spacing,
    index_timesteps,
    karras_sigmas,
    leading_timesteps,
    linspace_timesteps,
    log_snr_sigmas,
    noise_levels,
    quadratic_timesteps,
    time_range,
    trailing_timesteps,
)


def expand_as(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example vector [B] so that it broadcasts against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020 §4: beta_t increasing linearly from beta_1 to beta_T (float64)."""
    _check_T(T)
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(
            f"schedule.beta_start={beta_start} and schedule.beta_end={beta_end} must lie in (0, 1)"
        )
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 17: abar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    beta_t = min(1 - abar_t / abar_{t-1}, max_beta)."""
    _check_T(T)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"schedule.max_beta={max_beta} must lie in (0, 1)")
    if s < 0:
        raise ValueError(f"schedule.s={s} must be non-negative")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


# The grids moved to grids.py; their names stay importable from here for old code.
SPACINGS = NOISE_LEVEL_RANGE_SPACINGS  # the noise-level spacings under their old name (grids.SPACINGS is the vocabulary)

def gaussian_logp(z: Tensor, std: float) -> Tensor:
    """log N(z; 0, std^2 I), summed over all but the batch dimension."""
    d = z[0].numel()
    return -0.5 * z.flatten(1).double().pow(2).sum(1) / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def _check_T(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"schedule.T={T!r} must be a positive integer")


class Schedule(nn.Module, abc.ABC):
    """The forward process x_t = alpha(t) x_0 + sigma(t) eps shared by every method (Song et al. 2021 §3.4).

    The declared interface (as score_sde's abstract `SDE` class): a subclass gives `alpha`, `sigma`, `net_label`,
    `sample_t` and `timesteps`, and says what more it has by three class attributes that samplers, losses and
    the likelihood read instead of probing: `discrete` (DDPM's buffers `betas`, `posterior_*` under their paper
    names, and `respace`), `has_sde` (`sde(x, t)`, the forward SDE whose marginals these are) and `continuous`
    (t is a real time in [t_min, 1], not a step index)."""

    discrete: bool = False
    has_sde: bool = False
    continuous: bool = False

    @abc.abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """The signal scale alpha(t) of x_t."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """The noise scale sigma(t) of x_t."""

    @abc.abstractmethod
    def net_label(self, t: Tensor) -> Tensor:
        """The time label the network was trained with at t (the preconditioning's c_noise, `Denoiser.c_noise`)."""

    @abc.abstractmethod
    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Training times, one per example."""

    @abc.abstractmethod
    def timesteps(self, steps: int | None = None, spacing: str = DEFAULT_SPACING) -> list:
        """Decreasing times of a `steps`-step time grid (grids.py), all of them for None."""

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift f(x, t), diffusion g(t) [B]) of the forward SDE dx = f dt + g dw (Song et al. 2021 eq. 5); only
        where `has_sde`."""
        raise NotImplementedError(f"{type(self).__name__} has no SDE (has_sde = False)")

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x_0 + sigma(t) eps (Ho et al. eq. 4 for DDPM)."""
        return expand_as(self.alpha(t), x0) * x0 + expand_as(self.sigma(t), x0) * eps

    def prior_std(self) -> float:
        """Standard deviation of the prior p(x_T) = N(0, prior_std^2 I) (1 for variance-preserving processes)."""
        return 1.0

    def prior_logp(self, z: Tensor) -> Tensor:
        """log p_T(z) of the prior, per example."""
        return gaussian_logp(z, self.prior_std())

    def noise_level(self, t: Tensor) -> Tensor:
        """Karras et al. 2022 (EDM) eq. 4 / Table 1: the noise level sigma(t) / alpha(t) of x_t / alpha(t) = x_0 +
        (sigma / alpha) eps; DPM-Solver's lambda = log(alpha / sigma) is minus its log (Lu et al. 2022)."""
        return self.sigma(t) / self.alpha(t)

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """The time (float64) whose noise_level is `level`, clamped to the sampled range; here by bisection
        (noise_level increases with t), overridden in closed form where there is one."""
        t_max, t_min = time_range(self)
        level = torch.as_tensor(level, dtype=torch.float64)
        lo, hi = torch.full_like(level, t_min), torch.full_like(level, t_max)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.noise_level(mid).double() < level
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2


class DiscreteSchedule(Schedule):
    """DDPM's discrete forward process, Ho et al. 2020 eq. 4:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the buffers of §3 under their paper names."""

    discrete = True
    has_sde = True

    def __init__(self, betas: Tensor):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("schedule betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"schedule betas must lie in (0, 1); got min {betas.min().item():.3g}, "
                f"max {betas.max().item():.3g} (check schedule.beta_start / schedule.beta_end)"
            )
        self.T = len(betas)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Ho et al. eq. 7: beta~_t and the two coefficients of mu~_t(x_t, x_0).
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_1 = 0: clip the log at t = 1 with beta~_2, as the official code does.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def alpha(self, t: Tensor) -> Tensor:
        """sqrt(abar_t): the signal scale of q(x_t | x_0). A fractional index t (float tensor, used by the
        continuous samplers) interpolates log abar linearly between the steps."""
        if t.is_floating_point():
            return self._log_alphas_cumprod(t).mul(0.5).exp()
        return self.sqrt_alphas_cumprod[t]

    def sigma(self, t: Tensor) -> Tensor:
        """sqrt(1 - abar_t): the noise scale of q(x_t | x_0)."""
        if t.is_floating_point():
            return (-torch.expm1(self._log_alphas_cumprod(t))).sqrt()
        return self.sqrt_one_minus_alphas_cumprod[t]

    def _log_alphas_cumprod(self, t: Tensor) -> Tensor:
        """log abar at a fractional index, linear between the steps (the index-time SDE's exact marginal, `sde`);
        on [-1, 0] from log abar = 0 at t = -1 (the data) to log abar_0, clamped outside [-1, T - 1]."""
        before = t.double().clamp(-1, 0) + 1  # in [0, 1]: the share of the first step taken, for t < 0
        t = t.clamp(0, self.T - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        log_abar = self.alphas_cumprod.double().log()
        w = (t - lo).double()
        return torch.where(before < 1, before * log_abar[0], (1 - w) * log_abar[lo] + w * log_abar[hi])

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """The fractional step index whose interpolated log abar gives sigma / alpha = level (abar = 1 / (1 +
        level^2)): the exact inverse of `_log_alphas_cumprod`, clamped to [0, T - 1]. Samplers on a noise-level
        grid therefore feed the network fractional step labels, which its sinusoidal embedding takes as
        readily as integers (rounding to the nearest trained step would change the grid they chose)."""
        neg_log_abar = -self.alphas_cumprod.double().log()  # increasing in t
        target = torch.log1p(torch.as_tensor(level, dtype=torch.float64, device=neg_log_abar.device) ** 2)
        target = target.clamp(neg_log_abar[0], neg_log_abar[-1])
        hi = torch.searchsorted(neg_log_abar, target).clamp(1, self.T - 1)
        lo = hi - 1
        w = (target - neg_log_abar[lo]) / (neg_log_abar[hi] - neg_log_abar[lo])
        return lo.double() + w.clamp(0, 1)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The discrete VP process as an SDE in index time (Song et al. 2021 §3.4 / App. B): dx = -1/2 b(t) x dt
        + sqrt(b(t)) dw with b = -log(1 - beta_i) on (i - 1, i], so its marginals are exactly Ho et al.'s eq. 4
        at every step i. Returns (drift, diffusion [B])."""
        b = -self.alphas.double().log()[t.double().ceil().long().clamp(0, self.T - 1)]
        return -0.5 * expand_as(b, x) * x, b.sqrt()

    def net_label(self, t: Tensor) -> Tensor:
        """The network's time input: the step index, as in Ho et al.'s code."""
        return t.float()

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ Uniform({1, ..., T}) per example (Algorithm 1), as 0-based indices."""
        return torch.randint(0, self.T, (n,), device=device, generator=generator)

    def timesteps(self, steps: int | None = None, spacing: str = DEFAULT_SPACING) -> list[int]:
        """Decreasing step indices for a sampler that visits `steps` of the T steps (`index_timesteps`: trailing,
        leading, linspace or quadratic, the last Song et al. 2021 (DDIM) App. D.2's for CIFAR-10)."""
        return index_timesteps(self.T, steps, spacing)

    def respace(self, timesteps: list[int]) -> DiscreteSchedule:
        """Nichol & Dhariwal 2021 §4: the process on the increasing indices S = `timesteps` only, with
        beta_k = 1 - abar_{S_k} / abar_{S_{k-1}} (abar before S_0 taken as 1), so that its abar_k = abar_{S_k}.
        A new schedule; this one is unchanged."""
        if list(timesteps) != sorted(set(timesteps)) or not 0 <= timesteps[0] <= timesteps[-1] < self.T:
            raise ValueError(f"respaced timesteps must be increasing indices in [0, {self.T - 1}]; got {list(timesteps)}")
        abar = torch.cumprod(1 - self.betas.double(), 0)[list(timesteps)]
        return DiscreteSchedule(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])).to(self.betas.device)

    def extra_repr(self) -> str:
        return f"T={self.T}, beta_1={self.betas[0].item():.3g}, beta_T={self.betas[-1].item():.3g}"


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """DDPM's linear schedule (Ho et al. 2020 §4)."""
    return DiscreteSchedule(linear_betas(T, beta_start, beta_end))


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021 §3.2)."""
    return DiscreteSchedule(cosine_betas(T, s, max_beta))


def scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteSchedule:
    """sqrt(beta_t) increasing linearly from sqrt(beta_1) to sqrt(beta_T) (Rombach et al. 2022's latent diffusion;
    diffusers' beta_schedule="scaled_linear")."""
    return DiscreteSchedule(linear_betas(T, beta_start**0.5, beta_end**0.5) ** 2)


class NCSNSchedule(Schedule):
    """NCSN's noise levels (Song & Ermon 2019 §4.2): x_i = x_0 + sigma_i eps, sigma geometric from sigma_1 =
    sigma_max down to sigma_L = sigma_min. Index i = 0 is the smallest level (as DDPM's index 0 is the least
    noise), so index L - 1 is the paper's sigma_1. The network sees log sigma, mapped affinely onto [0, 999]."""

    def __init__(self, sigma_max: float = 1.0, sigma_min: float = 0.01, L: int = 10):
        super().__init__()
        if isinstance(L, bool) or not isinstance(L, int) or L < 2:
            raise ValueError(f"schedule.L={L!r} must be an integer >= 2")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"schedule.sigma_min={sigma_min} and schedule.sigma_max={sigma_max} need 0 < sigma_min < sigma_max")
        self.T, self.sigma_max, self.sigma_min = L, float(sigma_max), float(sigma_min)
        sigmas = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), L, dtype=torch.float64)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(self.sigma(t))

    def sigma(self, t: Tensor) -> Tensor:
        """sigma_i; a fractional level t (float tensor, used by the noise-level samplers) interpolates log sigma
        linearly, i.e. continues the geometric sequence, as the network's label 999 t / (L - 1) does."""
        if t.is_floating_point():
            t = t.double().clamp(0, self.T - 1)
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** (t / (self.T - 1))
        return self.sigmas[t]

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """The fractional level t with sigma(t) = level (the inverse of the geometric interpolation)."""
        level = torch.as_tensor(level, dtype=torch.float64)
        t = (self.T - 1) * torch.log(level / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(0, self.T - 1)

    def net_label(self, t: Tensor) -> Tensor:
        """999 log(sigma / sigma_min) / log(sigma_max / sigma_min): the noise level, on the U-Net's usual range."""
        return 999.0 * t.float() / (self.T - 1)

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """A level i ~ Uniform({1, ..., L}) per example (§4.2)."""
        return torch.randint(0, self.T, (n,), device=device, generator=generator)

    def timesteps(self, steps: int | None = None, spacing: str = DEFAULT_SPACING) -> list[int]:
        """Decreasing level indices (`index_timesteps`); the default starts at the largest level sigma_1."""
        return index_timesteps(self.T, steps, spacing)

    def prior_std(self) -> float:
        """Sampling starts from N(0, sigma_1^2 I) (the paper starts from uniform noise; a Gaussian of the largest
        level is the usual choice since NCSNv2)."""
        return self.sigma_max

    def extra_repr(self) -> str:
        return f"L={self.T}, sigma_1={self.sigma_max:g}, sigma_L={self.sigma_min:g}"


def ncsn(sigma_max: float = 1.0, sigma_min: float = 0.01, L: int = 10) -> NCSNSchedule:
    """NCSN (Song & Ermon 2019): L = 10 geometric levels from 1 to 0.01."""
    return NCSNSchedule(sigma_max, sigma_min, L)


def largest_pairwise_distance(x: Tensor) -> float:
    """max_ij ||x_i - x_j||: Song & Ermon 2020 (NCSNv2, technique 1) take sigma_1 about this large."""
    flat = x.flatten(1).double()
    return torch.cdist(flat, flat).max().item()


class ContinuousSchedule(Schedule):
    """A score SDE of Song et al. 2021 on t in [0, 1], with closed-form marginals x_t = alpha(t) x_0 + sigma(t) eps.
    Training draws t ~ U(t_eps, 1); samplers integrate from t = 1 down to t_min."""

    continuous = True
    has_sde = True

    t_max: float = 1.0  # where sampling starts (below 1 where the process has no noise level at t = 1)

    def __init__(self, t_min: float, t_eps: float = 1e-5):
        super().__init__()
        if not 0 < t_min < self.t_max:
            raise ValueError(f"schedule.t_min={t_min} must lie in (0, {self.t_max:g})")
        if not 0 <= t_eps < 1:
            raise ValueError(f"schedule.t_eps={t_eps} must lie in [0, 1)")
        self.t_min, self.t_eps, self.T = float(t_min), float(t_eps), 1

    def net_label(self, t: Tensor) -> Tensor:
        """999 t, the label of the DDPM U-Net (as score_sde's DDPM++ models with continuous VP)."""
        return 999.0 * t.float()

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U(t_eps, 1) per example (Song et al. 2021 eq. 7)."""
        return self.t_eps + (1 - self.t_eps) * torch.rand(n, device=device, generator=generator)

    def timesteps(self, steps: int | None = None, spacing: str = DEFAULT_SPACING) -> list[float]:
        """`steps` decreasing times from t_max (1 but for rectified flow) to t_min: even (trailing, leading, linspace
        and uniform all name the even grid here, which always starts at t_max) or quadratic (denser near t_min)."""
        steps = 1000 if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"sampler.steps={steps!r} must be an integer >= 2 for a continuous schedule")
        u = torch.linspace(1, 0, steps, dtype=torch.float64)
        if discrete_spacing(spacing) == "quadratic":
            u = u**2
        return (self.t_min + (self.t_max - self.t_min) * u).tolist()


class VPSDE(ContinuousSchedule):
    """Song et al. 2021 eq. 11: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max -
    beta_min); alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min), sigma^2 = 1 - alpha^2 (eq. 29)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_eps: float = 1e-5):
        super().__init__(t_min, t_eps)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"schedule.beta_min={beta_min} and schedule.beta_max={beta_max} need 0 < beta_min < beta_max")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta(t)
        return -0.5 * expand_as(beta, x) * x, beta.sqrt()

    def log_alpha_of_noise_level(self, level: Tensor) -> Tensor:
        """log alpha where sigma / alpha = level: sigma^2 = 1 - alpha^2 gives alpha^2 = 1 / (1 + level^2)."""
        return -0.5 * torch.log1p(level**2)

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """The root t >= 0 of 1/4 t^2 (beta_max - beta_min) + 1/2 t beta_min = -log alpha (exact), clamped to
        [t_min, 1]."""
        c = -self.log_alpha_of_noise_level(torch.as_tensor(level, dtype=torch.float64))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        t = 2 * c / (b + (b * b + 4 * a * c).sqrt())  # (-b + sqrt(b^2 + 4ac)) / 2a, without cancellation
        return t.clamp(self.t_min, 1.0)

    def extra_repr(self) -> str:
        return f"beta_min={self.beta_min:g}, beta_max={self.beta_max:g}"


class SubVPSDE(VPSDE):
    """Song et al. 2021 eq. 12: dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw; same alpha as
    VP, sigma(t) = 1 - alpha(t)^2 (eq. 29)."""

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2 * self.log_alpha(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta(t)
        return -0.5 * expand_as(beta, x) * x, (beta * -torch.expm1(4 * self.log_alpha(t))).sqrt()

    def log_alpha_of_noise_level(self, level: Tensor) -> Tensor:
        """log alpha where (1 - alpha^2) / alpha = level: the positive root alpha = (sqrt(level^2 + 4) - level) / 2."""
        return torch.log(2 / ((level**2 + 4).sqrt() + level))


class VESDE(ContinuousSchedule):
    """Song et al. 2021 eq. 9 / 30: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw, alpha = 1,
    sigma(t) = sigma_min (sigma_max / sigma_min)^t; prior N(0, sigma_max^2 I)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_eps: float = 1e-5):
        super().__init__(t_min, t_eps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"schedule.sigma_min={sigma_min} and schedule.sigma_max={sigma_max} need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """t = log(level / sigma_min) / log(sigma_max / sigma_min), clamped to [t_min, 1]."""
        level = torch.as_tensor(level, dtype=torch.float64)
        return (torch.log(level / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)).clamp(self.t_min, 1.0)

    def prior_std(self) -> float:
        return self.sigma_max

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}"


class EDMSchedule(VESDE):
    """Karras et al. 2022 (EDM) Table 1 / §5: x = x_0 + sigma eps with sigma in [sigma_min, sigma_max] = [0.002, 80],
    as the VE SDE sigma(t) = sigma_min (sigma_max / sigma_min)^t (so every VE sampler and the ODE likelihood apply);
    training draws ln sigma ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2) (`sample_t`), sampling starts from N(0, 80^2 I)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, P_mean: float = -1.2, P_std: float = 1.2,
                 t_min: float = 1e-5):
        super().__init__(sigma_min, sigma_max, t_min, t_eps=0.0)
        if not P_std > 0:
            raise ValueError(f"schedule.P_std={P_std} must be positive")
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """The time of sigma = exp(P_mean + P_std n), n ~ N(0, 1) (Karras et al. Table 1, "noise distribution"); a
        sigma outside [sigma_min, sigma_max] gets a time outside [0, 1], where sigma(t) continues geometrically."""
        log_sigma = self.P_mean + self.P_std * torch.randn(n, device=device, generator=generator)
        return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, P_mean={self.P_mean:g}, P_std={self.P_std:g}"


T_SAMPLINGS = ("uniform", "logit_normal")


class RectifiedFlow(ContinuousSchedule):
    """Flow matching on the straight path (Lipman et al. 2023's optimal-transport path with sigma_min = 0; Liu et
    al. 2023's rectified flow): x_t = (1 - t) x_0 + t eps, t in [0, 1]. Training draws t ~ U(0, 1) or
    logit-normal, t = sigmoid(m + s n) (Esser et al. 2024 §3.1, m = 0, s = 1). Sampling runs from t_max = 0.999
    (noise level t / (1 - t) = 999; alpha(1) = 0 has none) down to t_min. Its SDE (`sde`) has these marginals, so
    the reverse-SDE and probability-flow samplers and the ODE likelihood apply as to any score SDE."""

    t_max = 0.999

    def __init__(self, t_min: float = 1e-3, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
        super().__init__(t_min, t_eps=0.0)
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"schedule.t_sampling={t_sampling!r} must be one of {T_SAMPLINGS}")
        if not logit_std > 0:
            raise ValueError(f"schedule.logit_std={logit_std} must be positive")
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, float(logit_mean), float(logit_std)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U(0, 1), or t = sigmoid(m + s n) for logit_normal; kept below 1 (alpha(1) = 0)."""
        if self.t_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))
        return t.clamp(max=1 - 2**-24)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f(t) = d log alpha / dt = -1 / (1 - t) and g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = 2 t / (1 - t): the
        linear SDE whose marginals are x_t = (1 - t) x_0 + t eps (Song et al. 2021 App. B's construction)."""
        return -x / expand_as(1 - t, x), (2 * t / (1 - t)).sqrt()

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """t = level / (1 + level) (the inverse of t / (1 - t)), clamped to [t_min, t_max]."""
        level = torch.as_tensor(level, dtype=torch.float64)
        return (level / (1 + level)).clamp(self.t_min, self.t_max)

    def extra_repr(self) -> str:
        return f"t_sampling={self.t_sampling}"
