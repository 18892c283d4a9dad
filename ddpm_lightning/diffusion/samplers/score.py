"""Samplers of the score-based family: annealed Langevin dynamics, predictor-corrector and the
probability-flow ODE.

Like `ddpm` / `ddim` they are plain functions of (denoiser, x_T, noise): they ask the denoiser for the
score / x_0, take their times from `grids.grid` (or `ts` handed in) and ask the schedule for alpha(t), sigma(t)
and, where an SDE is needed, `sde(x, t)` (`Schedule.has_sde`).
They work for every schedule that has what they use; `check` refuses the others before any compute.
Where a step needs the transition q(x_t | x_s) = N(a x_s, v I) of the forward process, it is read off
the marginals: a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2 (true for every linear SDE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.grids import DEFAULT_SPACING, grid, time_range
from ddpm_lightning.diffusion.samplers.noise import PerSampleNoise
from ddpm_lightning.diffusion.samplers.report import report
from ddpm_lightning.diffusion.schedules import expand_as

__all__ = ["ald", "ode", "pc", "time_range"]  # time_range: grids.time_range, importable from here as before

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = ("langevin", "none")
ODE_METHODS = ("rk45", "heun", "midpoint", "euler")


def _require_sde(schedule, what: str) -> None:
    if not getattr(schedule, "has_sde", False):  # the declared `Schedule.has_sde`; an undeclared object has none
        raise ValueError(
            f"{what} needs a schedule with an SDE (schedule=linear, cosine, vp_sde, subvp_sde or ve_sde); "
            f"{type(schedule).__name__} has none. Choose sampler=ald, sampler=ddim or a pc predictor other than "
            "euler_maruyama."
        )


def _times(x: Tensor, t) -> Tensor:
    """t (an int step index or a float time) as a [B] tensor."""
    return torch.full((x.shape[0],), t, device=x.device)


def _transition(schedule, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(a, v) of q(x_t | x_s) = N(a x_s, v I), s < t."""
    a = schedule.alpha(t) / schedule.alpha(s)
    return a, (schedule.sigma(t) ** 2 - a**2 * schedule.sigma(s) ** 2).clamp(min=0)


def probability_flow(denoiser: Denoiser, x: Tensor, t: Tensor, **cond) -> Tensor:
    """Song et al. 2021 eq. 13: dx/dt = f(x, t) - 1/2 g(t)^2 grad_x log p_t(x)."""
    f, g = denoiser.schedule.sde(x, t)
    return (f - 0.5 * expand_as(g, x) ** 2 * denoiser.score(x, t, **cond)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Annealed Langevin dynamics


@torch.no_grad()
def ald(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    levels: int | None = None,
    spacing: str = DEFAULT_SPACING,
    ts: Sequence[float] | None = None,
    denoise: bool = True,
    callback: Callable[..., None] | None = None,
    **cond,
) -> Tensor:
    """Song & Ermon 2019 Algorithm 1: at each level sigma_i, T steps x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z
    with alpha_i = eps sigma_i^2 / sigma_L^2 (written here with step = alpha_i / 2, as the official code:
    x + step s + sqrt(2 step) z). `levels` < L visits that many levels from sigma_1 down on the grid `spacing`
    (`grids.grid`; or the levels `ts` handed in); sigma_L stays the schedule's smallest level. `denoise` adds NCSNv2's final Tweedie step x + sigma_L^2 s(x, sigma_L)."""
    check_ald(denoiser.schedule, n_steps_each=n_steps_each, step_lr=step_lr, levels=levels, spacing=spacing, ts=ts)
    schedule = denoiser.schedule
    ts = grid(schedule, levels, spacing) if ts is None else list(ts)
    # The paper's sigma_L is the schedule's smallest level, so a level's step size is the same whichever levels run.
    sigma_L = schedule.sigma(_times(x[:1], time_range(schedule)[1]).to(torch.long))[0]
    for k, t_now in enumerate(ts):
        t = _times(x, t_now)
        step = expand_as(step_lr * (schedule.sigma(t) / sigma_L) ** 2, x)
        for _ in range(n_steps_each):
            x = x + step * denoiser.score(x, t, **cond) + (2 * step).sqrt() * noise.randn_like(x)
        report(callback, k, x)
    return denoiser.x0(x, t, **cond) if denoise else x


def check_ald(schedule, n_steps_each: int = 100, step_lr: float = 2e-5, levels: int | None = None,
              spacing: str = DEFAULT_SPACING, ts=None, **_) -> None:
    if ts is None:
        grid(schedule, levels, spacing)
    if n_steps_each < 1:
        raise ValueError(f"sampler.n_steps_each={n_steps_each} must be positive")
    if step_lr <= 0:
        raise ValueError(f"sampler.step_lr={step_lr} must be positive")


ald.check = check_ald


# ---------------------------------------------------------------------------------------------------------
# Predictor-corrector


def euler_maruyama(denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, noise: PerSampleNoise, **cond) -> Tensor:
    """Song et al. 2021 eq. 6 discretised: x_s = x_t - [f - g^2 score] dt + g sqrt(dt) z, dt = t - s."""
    f, g = denoiser.schedule.sde(x, t)
    dt, g = expand_as(t - s, x), expand_as(g, x)
    x_mean = x - (f - g**2 * denoiser.score(x, t, **cond)) * dt
    return x_mean + g * dt.sqrt() * noise.randn_like(x)


def reverse_diffusion(denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, noise: PerSampleNoise, **cond) -> Tensor:
    """Song et al. 2021 eq. 46: for the forward step x_t = x_s + f_s + G_s z, x_s = x_t - f + G^2 score + G z,
    with f = (a - 1) x_t and G^2 = v of q(x_t | x_s)."""
    a, v = (expand_as(c, x) for c in _transition(denoiser.schedule, t, s))
    x_mean = x - (a - 1) * x + v * denoiser.score(x, t, **cond)
    return x_mean + v.sqrt() * noise.randn_like(x)


def ancestral(denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, noise: PerSampleNoise, **cond) -> Tensor:
    """Song et al. 2021 App. F ancestral sampling (DDPM Algorithm 2 for VP, eq. 47 for VE): the posterior
    q(x_s | x_t, x_0) at Tweedie's x_0, mean alpha_s v / sigma_t^2 x_0 + a sigma_s^2 / sigma_t^2 x_t,
    variance v sigma_s^2 / sigma_t^2."""
    schedule = denoiser.schedule
    a, v = (expand_as(c, x) for c in _transition(schedule, t, s))
    alpha_s, sigma_s, sigma_t = (expand_as(c, x) for c in (schedule.alpha(s), schedule.sigma(s), schedule.sigma(t)))
    x0 = denoiser.x0(x, t, **cond)
    x_mean = alpha_s * v / sigma_t**2 * x0 + a * sigma_s**2 / sigma_t**2 * x
    return x_mean + (v * sigma_s**2 / sigma_t**2).sqrt() * noise.randn_like(x)


def langevin(denoiser: Denoiser, x: Tensor, t: Tensor, r: float, alpha: Tensor, noise: PerSampleNoise, **cond) -> Tensor:
    """Song et al. 2021 Algorithm 4 (Langevin corrector): x <- x + eps score + sqrt(2 eps) z with
    eps = 2 alpha (r ||z|| / ||score||)^2, the norms taken at their expectations E||z||^2 = D and
    E||score||^2 = E||eps_theta||^2 / sigma^2 ~ D / sigma^2, i.e. eps = 2 alpha (r sigma_t)^2. (The official code
    averages the norms over the batch, so a sample depends on its batch; per-sample norms make the step depend on
    x, which biases Langevin dynamics.)"""
    eps = expand_as(2 * alpha * (r * denoiser.schedule.sigma(t)) ** 2, x)
    return x + eps * denoiser.score(x, t, **cond) + (2 * eps).sqrt() * noise.randn_like(x)


_PREDICTOR_STEPS = {"reverse_diffusion": reverse_diffusion, "euler_maruyama": euler_maruyama, "ancestral": ancestral}


@torch.no_grad()
def pc(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector: int = 1,
    spacing: str = DEFAULT_SPACING,
    ts: Sequence[float] | None = None,
    denoise: bool = True,
    callback: Callable[..., None] | None = None,
    **cond,
) -> Tensor:
    """Song et al. 2021 Algorithms 2-3 (predictor-corrector): at each of `steps` times, n_corrector Langevin
    steps, then one predictor step to the next time; `denoise` ends with Tweedie's x_0 at t_min.
    predictor="none" with corrector="langevin" is annealed Langevin with the snr step rule. The times: `grids.grid(
    schedule, steps, spacing)`, or `ts` handed in."""
    check_pc(denoiser.schedule, steps=steps, predictor=predictor, corrector=corrector, snr=snr, n_corrector=n_corrector,
             spacing=spacing, ts=ts)
    ts = grid(denoiser.schedule, steps, spacing) if ts is None else list(ts)
    x, t = pc_steps(denoiser, x, noise, ts, predictor, corrector, snr, n_corrector, callback=callback, **cond)
    return denoiser.x0(x, t, **cond) if denoise else x


def pc_steps(denoiser: Denoiser, x: Tensor, noise: PerSampleNoise, ts: Sequence, predictor: str, corrector: str,
             snr: float, n_corrector: int, after: Callable[[Tensor, Tensor], Tensor] | None = None,
             callback: Callable[..., None] | None = None, **cond) -> tuple[Tensor, Tensor]:
    """The loop of `pc` on the decreasing times `ts`: (x at the last time, that time as a [B] tensor).
    `after(x, t)`, when given, is applied after every corrector and every predictor step, t the time x is at
    (the imputation of Song et al. 2021 App. I.2 replaces the known pixels there, ddpm_lightning.diffusion.editing)."""
    schedule = denoiser.schedule
    for k, t_now in enumerate(ts):
        t = _times(x, t_now)
        s = _times(x, ts[k + 1]) if k + 1 < len(ts) else None
        if corrector == "langevin":
            # alpha_i of Algorithm 4: 1 - beta_i for VP (the a^2 of the next step), 1 for VE.
            alpha = _transition(schedule, t, s)[0] ** 2 if s is not None else torch.ones_like(t, dtype=x.dtype)
            for _ in range(n_corrector):
                x = langevin(denoiser, x, t, snr, alpha, noise, **cond)
                x = x if after is None else after(x, t)
        if s is not None and predictor != "none":
            x = _PREDICTOR_STEPS[predictor](denoiser, x, t, s, noise, **cond)
            x = x if after is None else after(x, s)
        report(callback, k, x)
    return x, t


def check_pc(schedule, steps: int = 1000, predictor: str = "reverse_diffusion", corrector: str = "langevin",
             snr: float = 0.16, n_corrector: int = 1, spacing: str = DEFAULT_SPACING, ts=None, **_) -> None:
    if predictor not in PREDICTORS:
        raise ValueError(f"sampler.predictor={predictor!r} must be one of {PREDICTORS}")
    if corrector not in CORRECTORS:
        raise ValueError(f"sampler.corrector={corrector!r} must be one of {CORRECTORS}")
    if predictor == "none" and corrector == "none":
        raise ValueError("sampler.predictor and sampler.corrector are both 'none': nothing would be sampled")
    if snr <= 0 or n_corrector < 1:
        raise ValueError(f"sampler.snr={snr} and sampler.n_corrector={n_corrector} must be positive")
    if predictor == "euler_maruyama":
        _require_sde(schedule, "sampler=pc with sampler.predictor=euler_maruyama")
    if ts is None:
        grid(schedule, steps, spacing)  # steps and spacing valid for this schedule


pc.check = check_pc


# ---------------------------------------------------------------------------------------------------------
# Probability-flow ODE

# Dormand & Prince 1980, RK5(4)7M: nodes, stages, 5th-order weights, and 5th minus 4th order weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def dopri5(
    f: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince RK45 (as scipy's RK45) from t0 to t1, with a step size per sample: each row of y
    [B, ...] is accepted or rejected by its own RMS error norm, so its path does not depend on the batch.
    Returns y(t1) and the number of evaluations of f (each a batched call)."""
    B = y.shape[0]
    direction = 1.0 if t1 > t0 else -1.0
    t = torch.full((B,), float(t0), device=y.device, dtype=torch.float64)
    h = torch.full_like(t, abs(t1 - t0) * 1e-2)
    k1 = f(y, t)
    nfe = 1
    for it in range(max_steps):
        remaining = (t1 - t) * direction
        active = remaining > 1e-12 * max(1.0, abs(t1))
        if not bool(active.any()):
            return y, nfe
        dt = torch.where(active, torch.minimum(h, remaining), torch.zeros_like(h)) * direction
        ks = [k1]
        for c, row in zip(_C[1:], _A[1:]):
            yi = y + expand_as(dt, y) * sum(a * k for a, k in zip(row, ks))
            ks.append(f(yi, t + c * dt))
        y_new = y + expand_as(dt, y) * sum(b * k for b, k in zip(_B, ks))
        k7 = f(y_new, t + dt)
        nfe += 6
        err = expand_as(dt, y) * sum(e * k for e, k in zip(_E, ks + [k7]))
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = (err / scale).flatten(1).double().pow(2).mean(1).sqrt()
        accept = active & (err_norm <= 1)
        m = expand_as(accept, y).bool()
        y, k1 = torch.where(m, y_new, y), torch.where(m, k7, k1)
        t = torch.where(accept, t + dt, t)
        factor = (0.9 * err_norm.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h = torch.where(active, dt.abs() * factor, h)
        if callback is not None:
            callback(it, y)
    raise RuntimeError(f"dopri5 did not reach t={t1} in {max_steps} steps; loosen sampler.rtol / sampler.atol")


def _ode_step(drift: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, s: Tensor, method: str) -> Tensor:
    """One step of dx/dt = drift from t to s: Euler, Heun (trapezoidal, 2 evaluations) or the explicit midpoint
    rule (2 evaluations)."""
    dt = expand_as(s - t, x)
    d = drift(x, t)
    if method == "midpoint":
        return x + dt * drift(x + 0.5 * dt * d, (t + s) / 2)
    x_euler = x + dt * d
    return x_euler if method == "euler" else x + dt * 0.5 * (d + drift(x_euler, s))


@torch.no_grad()
def ode(
    denoiser: Denoiser,
    x: Tensor,
    noise: PerSampleNoise,
    method: str = "rk45",
    steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    spacing: str = DEFAULT_SPACING,
    ts: Sequence[float] | None = None,
    denoise: bool = True,
    callback: Callable[..., None] | None = None,
    **cond,
) -> Tensor:
    """Song et al. 2021 eq. 13: integrate the probability-flow ODE from t = T down to t_min, with adaptive RK45
    (rtol, atol) or fixed Heun / midpoint / Euler steps on the times `grids.grid(schedule, steps, spacing)` (or `ts` handed in;
    rk45 runs over the schedule's whole time range); `denoise` ends with Tweedie's x_0 at the last. Deterministic: `noise` is not used."""
    check_ode(denoiser.schedule, method=method, steps=steps, rtol=rtol, atol=atol, spacing=spacing, ts=ts)
    schedule = denoiser.schedule
    ts = grid(schedule, steps, spacing) if ts is None else list(ts)
    drift = lambda y, t: probability_flow(denoiser, y, t, **cond)  # noqa: E731
    if method == "rk45":
        x, _ = dopri5(drift, x, *time_range(schedule), rtol, atol, callback=callback)
    else:
        for k in range(len(ts) - 1):
            x = _ode_step(drift, x, _times(x, float(ts[k])), _times(x, float(ts[k + 1])), method)
            report(callback, k, x)
    t = _times(x, float(ts[-1]))
    return denoiser.x0(x, t, **cond) if denoise else x


def check_ode(schedule, method: str = "rk45", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
              spacing: str = DEFAULT_SPACING, ts=None, **_) -> None:
    if method not in ODE_METHODS:
        raise ValueError(f"sampler.method={method!r} must be one of {ODE_METHODS}")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"sampler.rtol={rtol} and sampler.atol={atol} must be positive")
    _require_sde(schedule, "sampler=ode")
    if ts is None:
        grid(schedule, steps, spacing)


ode.check = check_ode
