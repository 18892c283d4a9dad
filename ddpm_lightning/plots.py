"""Pictures of samples and of the diffusion process: samples of points over their data (toy experiments), and
for image models a strip of the forward process x_t and the reverse chain of one sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.batch import unpack
from ddpm_lightning.images import save_grid


def _figure(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=figsize, dpi=100)


def save_scatter(samples: Tensor, path: str | Path, data: Tensor | None = None, title: str | None = None) -> Tensor:
    """Samples [N, 2] scattered over the data points (or for [N, 1] their histograms); written as a PNG. Returns
    the picture as uint8 [3, H, W] (for the loggers)."""
    samples = samples.detach().float().cpu().numpy()
    data = None if data is None else data.detach().float().cpu().numpy()
    if samples.ndim != 2 or samples.shape[1] not in (1, 2):
        raise ValueError(f"save_scatter draws points [N, 1] or [N, 2]; got {samples.shape}")
    plt, fig = _figure((4.2, 4.2) if samples.shape[1] == 2 else (5.0, 3.2))
    ax = fig.add_subplot()
    if samples.shape[1] == 2:
        if data is not None:
            ax.scatter(data[:, 0], data[:, 1], s=2, c="0.75", lw=0, label="data")
        ax.scatter(samples[:, 0], samples[:, 1], s=3, c="C3", lw=0, label="samples")
        ax.set_aspect("equal")
        lim = max(1.1, float(np.abs(samples).max()) + 0.05)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
    else:
        bins = np.linspace(-1.1, 1.1, 89)
        if data is not None:
            ax.hist(data[:, 0], bins=bins, density=True, color="0.75", label="data")
        ax.hist(samples[:, 0], bins=bins, density=True, histtype="step", color="C3", lw=1.5, label="samples")
        ax.set_xlabel("x")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    picture = torch.from_numpy(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1)
    fig.savefig(path)
    plt.close(fig)
    return picture


def display_scale(x: Tensor) -> Tensor:
    """x divided by max(1, its standard deviation) per example, so a noisy state of a variance-exploding process
    (sigma up to 50) is shown at unit scale; VP states and data are unchanged."""
    std = x.flatten(1).float().std(1).clamp(min=1.0)
    return x / std.reshape(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def forward_strip(schedule, x0: Tensor, columns: int = 8, seed: int = 0) -> Tensor:
    """Rows of x_t = alpha(t) x_0 + sigma(t) eps for each image of x0 [n, C, H, W] (Ho et al. eq. 4): column 0
    the data, then `columns` evenly spaced times from the schedule's t_min to t = T, one fixed eps per row.
    Returns [n * (columns + 1), C, H, W] in row-major order."""
    ts = schedule.timesteps(None)  # the whole grid: [T, ..., t_min]
    grid = torch.linspace(float(ts[-1]), float(ts[0]), columns, dtype=torch.float64)
    if isinstance(ts[0], int):  # discrete schedules: step indices
        grid = grid.round().long()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    frames = [x0]
    for t in grid.tolist():
        tt = torch.full((x0.shape[0],), t, device=x0.device)
        frames.append(display_scale(schedule.q_sample(x0, tt, eps)))
    return torch.stack(frames, 1).flatten(0, 1)


class ThinnedStates:
    """A sampler callback keeping about every k-th state of the first sample (k doubling as the chain grows), so
    a chain of any length is held in O(frames) memory."""

    def __init__(self, frames: int):
        self.limit, self.stride, self.count, self.states = 4 * frames, 1, 0, []

    def __call__(self, k: int, x: Tensor) -> None:
        if self.count % self.stride == 0:
            self.states.append(x[0].detach().float().cpu().clone())
        self.count += 1
        if len(self.states) > self.limit:
            self.states, self.stride = self.states[::2], 2 * self.stride


@torch.no_grad()
def reverse_chain(module, seed: int = 0, frames: int = 10, sampler=None, **cond) -> Tensor:
    """The reverse process of one sample (x_T to x_0) through the sampler's `callback(k, x)`: `frames` states
    evenly spaced along the chain, the last one the returned sample. [frames, C, H, W]."""
    keep = ThinnedStates(frames)
    final = module.sample([seed], sampler=sampler, callback=keep, **cond)[0].float().cpu()
    states = keep.states
    pick = np.linspace(0, len(states) - 1, frames - 1).round().astype(int) if states else []
    return display_scale(torch.stack([states[i] for i in pick] + [final]))


def save_process_strips(module, data: Tensor, out: str | Path, sampler=None, seed: int = 0, columns: int = 8) -> list[Path]:
    """forward_process.png (a row of x_t per data image) and reverse_chain.png (x_T to x_0 of the sample with
    `seed`) in `out`, for an image model; see README "From a random walk to DDPM"."""
    out = Path(out)
    scale = 4 if data.shape[-1] <= 16 else 2 if data.shape[-1] <= 32 else 1  # small images enlarged
    strip = forward_strip(module.schedule, data.to(module.device), columns, seed)
    paths = [out / "forward_process.png", out / "reverse_chain.png"]
    save_grid(strip.clamp(-1, 1), paths[0], nrow=columns + 1, display_scale=scale)
    chain = reverse_chain(module, seed, columns + 1, sampler)
    save_grid(chain.clamp(-1, 1), paths[1], nrow=columns + 1, display_scale=scale)
    return paths


def data_images(datamodule, n: int, split: str = "train") -> Tensor:
    """The first n images [n, C, H, W] of a data module's split."""
    datamodule.setup("validate")
    dataset = getattr(datamodule, f"{split}_set")
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([unpack(x)["x"] for x in items])
