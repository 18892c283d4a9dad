"""Editing with any trained model: inpainting by RePaint and image-to-image by SDEdit.

- `Inpaint`: RePaint (Lugmayr et al. 2022, Algorithm 1). At every reverse step the known pixels (mask = 1) are
  replaced by the input noised to the step's time, x_known = alpha x_input + sigma z, and the unknown ones (mask =
  0) take the sampler's step; with resampling (`jump_n_sample` > 1) the chain goes back up `jump_length` steps by
  the forward process, so that the generated part harmonises with the known part. `jump_n_sample=1` is the plain
  replacement baseline (Song et al. 2021, App. I "imputation" with replacement, no resampling). Reverse steps:
  `ddpm` (ancestral, the paper's) and `ddim` (Song, Meng & Ermon 2021 eq. 12, as diffusers' RePaintScheduler).
  With `pc` (predictor-corrector, for the score SDEs) it is Song et al. 2021 App. I.2's imputation: the known
  pixels are replaced by x_known = alpha(t) x_input + sigma(t) z after every predictor and every corrector step,
  t the time the chain is at (no jumps: `jump_n_sample` must be 1).
- `SDEdit`: Meng et al. 2022. The input is noised to t0 = `strength` of the schedule's time, x_t0 = alpha(t0) x +
  sigma(t0) z, and any sampler runs its own grid from t0 down (its grid truncated below t0, t0 first). At strength 1
  the input is forgotten: the sampler starts from the prior, i.e. samples from scratch with the same seeds.

An edit is handed to `DiffusionModule.sample(seeds, edit=...)`; it checks its inputs against the model and the
sampler (`check`) before any compute, and draws its noise only from the per-sample `noise`, first the prior draw
of `sample`, so each result depends on its seed alone.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.grids import grid, time_range
from ddpm_lightning.diffusion.samplers.ddpm import ddim, ddim_step, ddpm, eps_and_v, p_mean_log_variance, respaced
from ddpm_lightning.diffusion.samplers.karras import levels as level_grid
from ddpm_lightning.diffusion.samplers.report import report
from ddpm_lightning.diffusion.samplers.score import ald, pc, pc_steps
from ddpm_lightning.diffusion.schedules import expand_as

REPAINT_SAMPLERS = {"ddpm": ddpm, "ddim": ddim}


def sampler_options(sampler) -> tuple[Callable, dict]:
    """(the sampler function, its options: the function's defaults updated by the partial's keywords)."""
    func, options = sampler, {}
    while isinstance(func, functools.partial):
        options = {**func.keywords, **options}
        func = func.func
    defaults = {n: p.default for n, p in inspect.signature(func).parameters.items() if p.default is not inspect.Parameter.empty}
    return func, {**defaults, **options}


def _check_images(images: Tensor, data_shape: Sequence[int], n: int, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != len(data_shape) + 1:
        raise ValueError(f"{what}: give a tensor [N, {', '.join(map(str, data_shape))}] of images in [-1, 1]")
    if tuple(images.shape[1:]) != tuple(data_shape):
        raise ValueError(
            f"{what}: images of shape {tuple(images.shape[1:])} (channels, height, width) but the model makes "
            f"{tuple(data_shape)}: resize or convert them to the model's size and channels"
        )
    if len(images) != n:
        raise ValueError(f"{what}: {len(images)} images for {n} seeds; give one image per seed")
    if not torch.isfinite(images).all() or images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6:
        raise ValueError(f"{what}: images must be finite and in [-1, 1] (the model's range)")


# ---------------------------------------------------------------------------------------------------------
# RePaint


def repaint_levels(steps: int, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    """The RePaint schedule of Lugmayr et al. 2022 (Algorithm 1 with the time jumps of their §4.2 and code): the
    levels visited, from `steps` (the prior) to 0 (the data), one reverse step per decrease and one forward
    step per increase. Arriving at a level j that is a multiple of `jump_length` below steps - jump_length, the
    chain goes back up `jump_length` levels, jump_n_sample - 1 times in all at that level, before it goes on down."""
    for name, v in (("steps", steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"edit.{name}={v!r} must be an integer >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    path, level = [steps], steps
    while level > 0:
        level -= 1
        path.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                path.append(level)
    return path


def _check_mask(mask: Tensor, images: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.ndim != images.ndim:
        raise ValueError("edit.mask: give a tensor [N or 1, 1 or C, H, W] of 0 (to inpaint) and 1 (to keep)")
    if tuple(mask.shape[-2:]) != tuple(images.shape[-2:]) or mask.shape[1] not in (1, images.shape[1]) \
            or mask.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"edit.mask: shape {tuple(mask.shape)} does not fit images {tuple(images.shape)}: the mask must have the "
            "images' height and width, 1 or their channels, and one mask or one per image"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("edit.mask must be binary: 1 where the input is kept, 0 where it is inpainted")


class Inpaint:
    """Inpainting of `images` [N, C, H, W] in [-1, 1] where `mask` is 0 (kept where it is 1), by RePaint's
    resampling (`jump_length`, `jump_n_sample`; 1 and 1 is replacement) with a `ddpm` or `ddim` sampler, or by
    the predictor-corrector imputation of Song et al. 2021 (App. I.2) with `pc` (replacement, jump_n_sample=1)."""

    name = "inpaint"

    def __init__(self, images: Tensor, mask: Tensor, jump_length: int = 1, jump_n_sample: int = 1):
        self.images, self.mask = images, mask
        self.jump_length, self.jump_n_sample = jump_length, jump_n_sample

    def check(self, sampler, schedule, data_shape: Sequence[int], n: int) -> None:
        _check_images(self.images, data_shape, n, "edit.images")
        _check_mask(self.mask, self.images)
        func, options = sampler_options(sampler)
        if func is pc:
            if self.jump_n_sample != 1:
                raise ValueError(
                    f"task=inpaint with sampler=pc replaces the known pixels after every predictor and corrector step "
                    f"(Song et al. 2021 App. I.2), without RePaint's jumps back: set edit.jump_n_sample=1 (got {self.jump_n_sample})"
                )
            pc.check(schedule, **options)
            return
        if func not in REPAINT_SAMPLERS.values():
            raise ValueError(
                f"task=inpaint: RePaint runs with sampler=ddpm or sampler=ddim (its reverse step must be undone by the "
                f"forward process one step at a time), the score SDEs' imputation with sampler=pc; "
                f"{getattr(func, '__name__', func)} cannot serve it"
            )
        times = self._times(func, options, schedule)
        repaint_levels(len(times), self.jump_length, self.jump_n_sample)

    @staticmethod
    def _times(func, options: dict, schedule) -> list:
        """The sampler's decreasing time grid (its `ts`, else `grids.grid(schedule, steps, spacing)`)."""
        if options.get("ts") is not None:
            return list(options["ts"])
        if func is ddpm:
            func.check(schedule, **{k: options[k] for k in ("variance", "steps", "spacing")})
        return grid(schedule, options.get("steps"), options.get("spacing"))

    def __call__(self, sampler, denoiser: Denoiser, noise, shape: Sequence[int], callback=None, **cond) -> Tensor:
        func, options = sampler_options(sampler)
        x = noise.randn_like(self.images.to(torch.float32)) * denoiser.schedule.prior_std()
        if func is pc:
            return pc_impute(denoiser, x, noise, self.images.to(x), self.mask.to(x), options, callback, **cond)
        return repaint(denoiser, x, noise, self.images.to(x), self.mask.to(x), func, options, self.jump_length,
                       self.jump_n_sample, callback, **cond)


def _level_scales(schedule, times: Sequence, device) -> tuple[list[float], list[float]]:
    """alpha and sigma of each level: level 0 the data (1, 0), level l >= 1 the increasing time times[l - 1]."""
    t = torch.tensor(list(times), device=device)
    alphas, sigmas = schedule.alpha(t).double().tolist(), schedule.sigma(t).double().tolist()
    return [1.0, *alphas], [0.0, *sigmas]


def _reverse_step(func, options: dict, denoiser: Denoiser, schedule):
    """(the increasing times S of the grid, step(x, k, z) -> (x at level k, x_0 prediction)) for the reverse step
    from level k + 1 (time S[k]) to level k with the noise z."""
    if func is ddpm:
        times = Inpaint._times(func, options, schedule)
        S, process = respaced(schedule, times)
        variance, clip = options["variance"], options["clip_denoised"]

        def step(x, k, z, **cond):
            t = torch.full((x.shape[0],), S[k], device=x.device, dtype=torch.long)
            eps, v = eps_and_v(denoiser, x, t, variance, **cond)
            mean, log_var, x0 = p_mean_log_variance(denoiser, process, x, t, torch.full_like(t, k), eps, v, variance, clip)
            return (mean + log_var.mul(0.5).exp() * z if k > 0 else mean), x0

        return S, step
    S = Inpaint._times(func, options, schedule)[::-1]

    def step(x, k, z, **cond):
        return ddim_step(denoiser, x, S[k], S[k - 1] if k > 0 else None, options["eta"], options["clip_denoised"],
                         lambda _: z, **cond)

    return S, step


@torch.no_grad()
def repaint(denoiser: Denoiser, x: Tensor, noise, images: Tensor, mask: Tensor, func, options: dict,
            jump_length: int = 1, jump_n_sample: int = 1, callback=None, **cond) -> Tensor:
    """Lugmayr et al. 2022 Algorithm 1 on the sampler's grid: for each reverse step one draw z gives both the
    unknown part's step noise and the known part's forward noise x_known = alpha x_input + sigma z (the mask
    splits the pixels, so one draw is two independent ones; diffusers' RePaintScheduler draws the same way); a
    jump back up one level is the forward transition x_t ~ N((alpha_t / alpha_s) x_s, (sigma_t^2 - (alpha_t /
    alpha_s)^2 sigma_s^2) I), on DDPM's process N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
    schedule = denoiser.schedule
    S, step = _reverse_step(func, options, denoiser, schedule)
    alphas, sigmas = _level_scales(schedule, S, x.device)
    path = repaint_levels(len(S), jump_length, jump_n_sample)
    for i, (here, there) in enumerate(zip(path, path[1:])):
        z = noise.randn_like(x)
        if there < here:
            unknown, x0 = step(x, there, z, **cond)
            known = alphas[there] * images + sigmas[there] * z
            x = mask * known + (1 - mask) * unknown
            report(callback, i, x, x0)
        else:
            ratio = alphas[there] / alphas[here]
            x = ratio * x + math.sqrt(max(sigmas[there] ** 2 - ratio**2 * sigmas[here] ** 2, 0.0)) * z
    return x


class _LastDraw:
    """The per-sample noise, remembering its last draw (the step's z, reused for the known pixels)."""

    def __init__(self, noise):
        self.noise, self.last = noise, None

    def randn_like(self, x: Tensor) -> Tensor:
        self.last = self.noise.randn_like(x)
        return self.last


@torch.no_grad()
def pc_impute(denoiser: Denoiser, x: Tensor, noise, images: Tensor, mask: Tensor, options: dict, callback=None,
              **cond) -> Tensor:
    """Song et al. 2021 App. I.2 (imputation) with the predictor-corrector sampler (`pc`'s options): after every
    corrector and every predictor step the known pixels are replaced by the input noised to the time t the chain is
    at, x_known = alpha(t) x_input + sigma(t) z. z is the step's own draw (the mask splits the pixels, so one draw
    is two independent ones, as in `repaint`), so an empty mask gives `pc`'s samples exactly. With `denoise` the
    unknown pixels end at Tweedie's x_0; the known ones end as the input."""
    schedule = denoiser.schedule
    ts = grid(schedule, options["steps"], options["spacing"]) if options.get("ts") is None else list(options["ts"])
    drawn = _LastDraw(noise)

    def replace(x: Tensor, t: Tensor) -> Tensor:
        known = expand_as(schedule.alpha(t), x) * images + expand_as(schedule.sigma(t), x) * drawn.last
        return mask * known.to(x.dtype) + (1 - mask) * x

    x, t = pc_steps(denoiser, x, drawn, ts, options["predictor"], options["corrector"], options["snr"],
                    options["n_corrector"], after=replace, callback=callback, **cond)
    x = denoiser.x0(x, t, **cond) if options["denoise"] else x
    return mask * images + (1 - mask) * x


# ---------------------------------------------------------------------------------------------------------
# SDEdit


def sdedit_time(schedule, strength: float):
    """t0 of SDEdit (Meng et al. 2022) at `strength` in (0, 1]: the step index round(strength T) - 1 (at least 0)
    of a schedule on step indices, so that strength k / steps lands on the k-th point of a trailing grid as in
    diffusers' image-to-image; t_min + strength (t_max - t_min) of a continuous one."""
    if getattr(schedule, "continuous", False):
        t_max, t_min = time_range(schedule)
        return t_min + strength * (t_max - t_min)
    return max(round(strength * schedule.T) - 1, 0)


def truncated_grid(func, options: dict, schedule, t0) -> dict:
    """The sampler's own grid from t0 down: `ts` (or `sigmas`, for a sampler on noise levels) with t0 (its noise
    level) first and the points of the sampler's grid below it."""
    if "sigmas" in inspect.signature(func).parameters:
        full = level_grid(schedule, options["steps"], options["spacing"], options.get("rho", 7.0), options.get("sigmas"))
        top = float(schedule.noise_level(torch.tensor([t0], dtype=torch.float64, device=_device(schedule)))[0])
        return {"sigmas": [top] + [s for s in full if s < top * (1 - 1e-9)]}
    full = list(options["ts"]) if options.get("ts") is not None else grid(schedule, options.get("steps"), options.get("spacing"))
    below = [t for t in full if t < t0 - 1e-9 * max(abs(t0), 1)]
    return {"ts": [t0] + below}


def _device(schedule) -> torch.device:
    return next(schedule.buffers(), torch.empty(0)).device


class SDEdit:
    """Image-to-image (Meng et al. 2022) of `images` [N, C, H, W] in [-1, 1] at `strength` in (0, 1], with any
    sampler on times or noise levels (not annealed Langevin dynamics, `ald`, whose levels are not a time grid)."""

    name = "sdedit"

    def __init__(self, images: Tensor, strength: float = 0.5):
        self.images, self.strength = images, strength

    def check(self, sampler, schedule, data_shape: Sequence[int], n: int) -> None:
        _check_images(self.images, data_shape, n, "edit.images")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"strength={s!r} must lie in (0, 1] (the share of the forward process the input is noised by)")
        func, options = sampler_options(sampler)
        if func is ald:
            raise ValueError("task=sdedit: sampler=ald cannot start part-way; use sampler=pc (Meng et al.'s VE-SDE sampler)")
        truncated_grid(func, options, schedule, sdedit_time(schedule, s))

    def __call__(self, sampler, denoiser: Denoiser, noise, shape: Sequence[int], callback=None, **cond) -> Tensor:
        schedule = denoiser.schedule
        z = noise.randn_like(self.images.to(torch.float32))
        if self.strength == 1:  # the forward process at its end is the prior: sampling from scratch
            return sampler(denoiser, z * schedule.prior_std(), noise, callback=callback, **cond)
        func, options = sampler_options(sampler)
        t0 = sdedit_time(schedule, self.strength)
        t = torch.tensor([t0], device=z.device)
        x = schedule.alpha(t)[0] * self.images.to(z) + schedule.sigma(t)[0] * z
        return sampler(denoiser, x, noise, callback=callback, **truncated_grid(func, options, schedule, t0), **cond)
