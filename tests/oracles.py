"""Networks whose eps-prediction is exact in closed form, to test samplers without training."""

from __future__ import annotations

import torch
from torch import nn

from ddpm_lightning.schedules import expand_as


class GaussianEps(nn.Module):
    """Exact eps for data N(m, s^2 I): x_t ~ N(alpha m, alpha^2 s^2 + sigma^2), so
    E[eps | x_t] = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2). `scale` != 1 makes it deliberately wrong."""

    def __init__(self, schedule, mean: float, std: float, scale: float = 1.0):
        super().__init__()
        self.schedule, self.mean, self.std, self.scale = schedule, mean, std, scale

    def forward(self, x, label, **cond):
        t = label.long() if not getattr(self.schedule, "continuous", False) else label
        a, s = expand_as(self.schedule.alpha(t), x), expand_as(self.schedule.sigma(t), x)
        return self.scale * s * (x - a * self.mean) / (a**2 * self.std**2 + s**2)
