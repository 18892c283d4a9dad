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


class GaussianMixtureEps(nn.Module):
    """Exact eps for a mixture of N(m_k, s^2 I) with equal weights, one component per class k (Gaussian data
    vectors [B, D]). With labels y the eps of component y (sigma (x_t - alpha m_y) / v, v = alpha^2 s^2 + sigma^2);
    with the null label y = K (or none) the mixture's eps, sum_k p(k | x_t) eps_k."""

    def __init__(self, schedule, means: torch.Tensor, std: float):
        super().__init__()
        self.schedule, self.means, self.std = schedule, means.double(), std
        self.num_classes = len(means)

    def _stats(self, x, label):
        t = label.long()
        a, s = expand_as(self.schedule.alpha(t), x).double(), expand_as(self.schedule.sigma(t), x).double()
        v = a**2 * self.std**2 + s**2
        diff = x.double()[:, None] - a[:, None] * self.means[None]  # [B, K, D]
        return s, v, diff

    def log_posterior(self, x, label):
        """log p(k | x_t) for every k: [B, K]."""
        _, v, diff = self._stats(x, label)
        return torch.log_softmax(-(diff**2).sum(-1) / (2 * v), -1)  # v: [B, 1]

    def forward(self, x, label, y=None):
        s, v, diff = self._stats(x, label)
        eps_k = s[:, None] * diff / v[:, None]  # [B, K, D]
        weights = self.log_posterior(x, label).exp()
        eps = (weights[..., None] * eps_k).sum(1)
        if y is not None:
            cond = y < self.num_classes
            eps = torch.where(cond[:, None], eps_k[torch.arange(len(x)), y.clamp(max=self.num_classes - 1)], eps)
        return eps.to(x.dtype)


class GaussianMixtureClassifier(nn.Module):
    """The exact noise-aware classifier of GaussianMixtureEps: logits log p(y | x_t)."""

    def __init__(self, mixture: GaussianMixtureEps):
        super().__init__()
        self.mixture, self.num_classes = mixture, mixture.num_classes

    def forward(self, x, label):
        return self.mixture.log_posterior(x, label).to(x.dtype)
