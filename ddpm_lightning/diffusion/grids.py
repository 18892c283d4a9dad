"""Time grids: which times t, or which noise levels sigma, a sampler visits (its `spacing`), in one vocabulary.

Every sampler takes its grid from `grid(schedule, steps, spacing, rho)` (or is handed one: `ts` or `sigmas`), so a
sampler never chooses its own times. The names, for every sampler:

- `trailing` (the default), `leading`, `linspace`, `quadratic`: grids in the schedule's time (Lin et al. 2024,
  Table 2; Song, Meng & Ermon 2021 App. D.2). On a discrete schedule they are step indices.
- `karras` (Karras et al. 2022 eq. 5, `rho`) and `log_snr` (Lu et al. 2022): grids in the noise level
  sigma / alpha, from the schedule's sigma_max to its sigma_min.
- `uniform`: the old name of two grids, kept so that stored configs sample as they did: `leading` on a time
  grid, and levels even in the schedule's time on a noise-level grid.

A sampler on times (ddpm, ddim, ald, pc, ode) asks for `grid(...)`; one on noise levels (dpmpp_2m, heun, euler,
euler_ancestral) for `grid(..., levels=True)`: the noise levels of the same times (a time spacing), or the times
of the same noise levels (a level spacing), so that both kinds visit the same points for the same name.
Schedules are read only through `timesteps`, `noise_level` and `t_of_noise_level`; nothing here imports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Discrete time grids: which `steps` of the T step indices a sampler visits (Lin et al. 2024, "Common diffusion noise
# schedules and sample steps are flawed", Table 2, names them). "uniform", the only even spacing before these names,
# was i * (T // steps), i.e. "leading": old configs and checkpoints that say `spacing: uniform` sample as before.
DISCRETE_SPACINGS = ("trailing", "leading", "linspace", "quadratic")
SPACING_ALIASES = {"uniform": "leading"}
DEFAULT_SPACING = "trailing"
LEVEL_SPACINGS = ("karras", "log_snr")
# The vocabulary of `sampler.spacing`, for every sampler (the module's docstring).
SPACINGS = (*DISCRETE_SPACINGS, *LEVEL_SPACINGS, "uniform")


def trailing_timesteps(T: int, steps: int) -> list[int]:
    """Lin et al. 2024 Table 2, "trailing": t_i = round(T - i T / steps) - 1, i = 0 .. steps - 1. Starts at T - 1 for
    every steps; consecutive entries are T / steps >= 1 apart, so all are distinct. Computed as diffusers'
    timestep_spacing="trailing" does (numpy's float arange, rounded half to even), so a tie such as 937.5 lands
    where diffusers' does; unlike diffusers' arange, which can overshoot to an extra index -1, it stops at `steps`."""
    return [int(v) - 1 for v in np.arange(T, 0, -T / steps).round()[:steps]]


def leading_timesteps(T: int, steps: int) -> list[int]:
    """Lin et al. 2024 Table 2, "leading" (diffusers' default timestep_spacing, steps_offset 0; DDIM's code's
    uniform skip): t_i = i (T // steps), i = steps - 1 .. 0. Starts at (steps - 1)(T // steps), which is T - 1 only
    when steps = T; for steps > T / 2 it is steps - 1, the middle of the chain."""
    return [i * (T // steps) for i in range(steps - 1, -1, -1)]


def linspace_timesteps(T: int, steps: int) -> list[int]:
    """Lin et al. 2024 Table 2, "linspace": t_i = round(i (T - 1) / (steps - 1)), i = steps - 1 .. 0: both T - 1 and
    0. Computed as diffusers' timestep_spacing="linspace" does (numpy's float linspace, rounded half to even), so an
    exact tie such as 499.5 lands where diffusers' does. One step is [T - 1] (diffusers' would be [0])."""
    if steps == 1:
        return [T - 1]
    return [int(v) for v in np.linspace(0, T - 1, steps).round()[::-1]]


def quadratic_timesteps(T: int, steps: int) -> list[int]:
    """Song, Meng & Ermon 2021 (DDIM) App. D.2, CIFAR-10's quadratic grid as in their code: tau_i = floor(c i^2),
    c = 0.8 T / (steps - 1)^2 (computed exactly), dense near t = 0 and topping at floor(0.8 T). Where the floor
    repeats an index (small i), tau_i is lifted to tau_{i-1} + 1, so the grid has exactly `steps` distinct entries
    (at most max(steps - 1, floor(0.8 T)) <= T - 1). One step is [floor(0.8 T)]."""
    top = 4 * T // 5
    if steps == 1:
        return [top]
    seq: list[int] = []
    for i in range(steps):
        tau = 4 * T * i * i // (5 * (steps - 1) ** 2)
        seq.append(tau if not seq or tau > seq[-1] else seq[-1] + 1)
    return seq[::-1]


_GRIDS = {"trailing": trailing_timesteps, "leading": leading_timesteps, "linspace": linspace_timesteps,
          "quadratic": quadratic_timesteps}


def discrete_spacing(spacing: str) -> str:
    """The canonical name of a discrete spacing ("uniform" -> "leading"); refuses an unknown one."""
    name = SPACING_ALIASES.get(spacing, spacing)
    if name in LEVEL_SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} is a grid of noise levels: ask grids.grid for it, not a time grid")
    if name not in _GRIDS:
        raise ValueError(
            f"sampler.spacing={spacing!r} must be one of {DISCRETE_SPACINGS + LEVEL_SPACINGS} (or 'uniform', the old "
            "name of 'leading')"
        )
    return name


def index_timesteps(T: int, steps: int | None = None, spacing: str = DEFAULT_SPACING) -> list[int]:
    """`steps` distinct, decreasing indices of T discrete steps (all of them for None), spaced by `spacing`:
    trailing (the default; starts at T - 1), leading, linspace or quadratic (see their functions)."""
    name = discrete_spacing(spacing)
    if steps is None:
        return list(range(T - 1, -1, -1))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"sampler.steps={steps!r} must lie in [1, schedule.T={T}] (an integer)")
    return _GRIDS[name](T, steps)




def time_range(schedule) -> tuple[float, float]:
    """(T, t_min): the first and last of the schedule's timesteps, where the samplers start and stop."""
    ts = schedule.timesteps(None)
    return float(ts[0]), float(ts[-1])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0 .. N - 1 (float64)."""
    i = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def log_snr_sigmas(sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """Levels uniform in lambda = log(alpha / sigma) = -log(sigma / alpha) (Lu et al. 2022, DPM-Solver's
    "logSNR" spacing): geometric from sigma_max to sigma_min."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps, dtype=torch.float64)


NOISE_LEVEL_RANGE_SPACINGS = ("karras", "log_snr", "uniform")  # the grids that run from sigma_max to sigma_min


def check_spacing(steps: int, spacing: str, rho: float) -> None:
    """Refuses a spacing outside the vocabulary (with the list), a bad `steps` or a non-positive `rho`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler.steps={steps!r} must be an integer >= 1")
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} must be one of {SPACINGS} ('uniform' is an old name, see docs/sampling.md)")
    if not rho > 0:
        raise ValueError(f"sampler.rho={rho} must be positive (Karras et al. use 7)")


def _device(schedule) -> torch.device:
    return next(schedule.buffers(), torch.empty(0)).device


def noise_levels(schedule, steps: int, spacing: str = "karras", rho: float = 7.0) -> Tensor:
    """The noise levels (sigma / alpha, float64) of a `steps`-step sampler: sigma_0 = sigma_max, ..., sigma_{N-1} =
    sigma_min of the schedule (its noise_level at the first and last of its timesteps), then sigma_N = 0, the
    data. spacing: "uniform" in the schedule's time t, "log_snr" uniform in lambda, or "karras" (rho)."""
    check_spacing(steps, spacing, rho)
    if spacing not in NOISE_LEVEL_RANGE_SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r}: noise_levels spans sigma_max to sigma_min only for {NOISE_LEVEL_RANGE_SPACINGS}")
    t_max, t_min = time_range(schedule)
    device = _device(schedule)
    ends = schedule.noise_level(torch.tensor([t_max, t_min], dtype=torch.float64, device=device)).double().cpu()
    sigma_max, sigma_min = ends.tolist()
    if steps == 1:
        levels = ends[:1]
    elif spacing == "karras":
        levels = karras_sigmas(sigma_min, sigma_max, steps, rho)
    elif spacing == "log_snr":
        levels = log_snr_sigmas(sigma_min, sigma_max, steps)
    else:
        levels = schedule.noise_level(torch.linspace(t_max, t_min, steps, dtype=torch.float64, device=device)).double().cpu()
    levels[0], levels[-1] = sigma_max, (sigma_min if steps > 1 else sigma_max)
    return torch.cat([levels, levels.new_zeros(1)])


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """A grid of noise levels handed in (`sampler.sigmas`): at least two, strictly decreasing, ending at 0."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2 or sigmas[-1] != 0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sampler.sigmas={sigmas} must be at least two strictly decreasing noise levels ending at 0")
    return sigmas


def grid(schedule, steps: int | None, spacing: str = DEFAULT_SPACING, rho: float = 7.0, levels: bool = False) -> list:
    """The one grid of every sampler. levels=False: the decreasing times t_0 > ... > t_{N-1} a sampler on times
    visits (step indices for a time spacing on a discrete schedule, all of them for steps=None; for a level spacing,
    the times `t_of_noise_level` of its levels). levels=True: the noise levels sigma_0 > ... > sigma_{N-1} > sigma_N
    = 0 of a sampler on noise levels (`noise_levels` for karras, log_snr and the old uniform; the noise levels of
    the time grid for a time spacing)."""
    if steps is None and not levels:
        return schedule.timesteps(None)
    check_spacing(steps, spacing, rho)
    if not levels and schedule.discrete and steps > schedule.T:  # a time sampler visits at most the T steps
        raise ValueError(f"sampler.steps={steps!r} must lie in [1, schedule.T={schedule.T}] (an integer)")
    if levels and spacing in NOISE_LEVEL_RANGE_SPACINGS:
        return noise_levels(schedule, steps, spacing, rho).tolist()
    if spacing in LEVEL_SPACINGS:
        sigmas = noise_levels(schedule, steps, spacing, rho)
        return schedule.t_of_noise_level(sigmas[:-1].to(_device(schedule))).tolist()
    ts = schedule.timesteps(steps, spacing)
    if not levels:
        return ts
    return schedule.noise_level(torch.tensor(ts, device=_device(schedule))).double().tolist() + [0.0]
