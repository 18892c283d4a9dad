"""Pictures of samples and of the diffusion process: samples of points over their data (toy experiments), and
for image models a strip of the forward process x_t and the reverse chain of one sample."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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
