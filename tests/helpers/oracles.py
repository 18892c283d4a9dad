"""Networks whose eps-prediction is exact in closed form, to test samplers without training."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion import schedules
from ddpm_lightning.diffusion.schedules import expand_as


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


class GaussianMixture:
    """A mixture of Gaussians sum_k w_k N(m_k, S_k) and its exact marginals under x_t = alpha x_0 + sigma eps:
    p_t = sum_k w_k N(alpha m_k, alpha^2 S_k + sigma^2 I) (float64), in 2-D."""

    def __init__(self, weights, means, covs):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.m = torch.as_tensor(means, dtype=torch.float64)
        self.S = torch.as_tensor(covs, dtype=torch.float64)
        assert self.m.shape[1] == 2, "the closed forms below are written for 2-D data"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.m.shape[1], dtype=torch.float64, generator=generator)
        return self.m[k] + (torch.linalg.cholesky(self.S)[k] @ z[:, :, None])[:, :, 0]

    def _components(self, alpha, sigma):
        d = self.m.shape[1]
        a, s = alpha.double()[:, None, None], sigma.double()[:, None, None]
        cov = a[..., None] ** 2 * self.S[None] + (s**2)[..., None] * torch.eye(d, dtype=torch.float64)  # [B, K, d, d]
        return a * self.m[None], cov

    def log_prob(self, x, alpha=None, sigma=None):
        """log p_t(x) per row of x [B, d]; alpha = 1, sigma = 0 is the data density."""
        x = x.double()
        alpha = torch.ones(len(x), dtype=torch.float64) if alpha is None else alpha
        sigma = torch.zeros(len(x), dtype=torch.float64) if sigma is None else sigma
        log_joint, _ = self._log_joint(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=1)

    def score(self, x, alpha, sigma):
        """grad_x log p_t(x) = sum_k r_k(x) (-C_k^{-1} (x - alpha m_k))."""
        x = x.double()
        log_joint, grads = self._log_joint(x, alpha, sigma)
        return (torch.softmax(log_joint, dim=1)[..., None] * grads).sum(1)

    def _log_joint(self, x, alpha, sigma):
        """log w_k N(x; alpha m_k, C_k) [B, K] and -C_k^{-1} (x - alpha m_k) [B, K, d]."""
        mean, cov = self._components(alpha, sigma)
        diff = x[:, None] - mean
        a, b, d = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]  # 2 x 2 in closed form (fast)
        det = a * d - b * b
        u, v = diff[..., 0], diff[..., 1]
        grads = -torch.stack([d * u - b * v, a * v - b * u], -1) / det[..., None]
        quad = (diff * -grads).sum(-1)
        logdet = det.log()
        return self.w.log() - 0.5 * (quad + logdet + x.shape[1] * math.log(2 * math.pi)), grads

    def responsibilities(self, x):
        one = torch.ones(len(x), dtype=torch.float64)
        return torch.softmax(self._log_joint(x.double(), one, 0 * one)[0], dim=1)


class MixtureDenoiser(Denoiser):
    """A denoiser whose eps is exact for mixture data under any schedule: eps = -sigma(t) score_t(x).
    `scale` != 1 scales the score, a deliberately wrong model."""

    def __init__(self, mixture: GaussianMixture, schedule, scale: float = 1.0):
        super().__init__(nn.Identity(), schedule)
        self.mixture, self.scale = mixture, scale

    def eps(self, x, t, **cond):
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return (-self.scale * sigma.double()[:, None] * self.mixture.score(x, alpha, sigma)).to(x.dtype)


class BatchNoise:
    """One generator for the whole batch: the PerSampleNoise interface, fast for thousands of samples."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


class GaussianMixtureEps(nn.Module):
    """Exact eps for a mixture of N(m_k, s^2 I) with equal weights, one component per class k (Gaussian data
    vectors [B, D]). With labels y the eps of component y (sigma (x_t - alpha m_y) / v, v = alpha^2 s^2 + sigma^2);
    with the null label y = K (or none) the mixture's eps, sum_k p(k | x_t) eps_k."""

    def __init__(self, schedule, means: torch.Tensor, std: float):
        super().__init__()
        self.schedule, self.means, self.std = schedule, means.double(), std
        self.num_classes = len(means)

    def _stats(self, x, label):
        t = label  # the sampler's t (the test's Denoiser passes it through as the label)
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


MIXTURE = GaussianMixture(
    weights=[0.5, 0.3, 0.2],
    means=[[-1.0, 0.0], [1.0, 0.5], [0.2, -1.2]],
    covs=[[[0.09, 0.03], [0.03, 0.06]], [[0.04, 0.0], [0.0, 0.12]], [[0.06, -0.02], [-0.02, 0.05]]],
)


SCHEDULES = {
    "linear": schedules.linear,
    "ncsn": functools.partial(schedules.ncsn, sigma_max=3.0, sigma_min=0.01, L=10),  # sigma_1 > the largest distance
    "ncsn_fine": functools.partial(schedules.ncsn, sigma_max=3.0, sigma_min=0.01, L=100),  # for one PC step per level
    "vp_sde": schedules.VPSDE,
    "subvp_sde": schedules.SubVPSDE,
    "ve_sde": functools.partial(schedules.VESDE, sigma_max=5.0),
}


def mixture_z_scores(x: torch.Tensor) -> torch.Tensor:
    """z-scores of the weights, means and covariances estimated with the true responsibilities r_k: for exact
    samples E[r_k] = w_k, E[r_k x] = w_k m_k and E[r_k (x - m_k)(x - m_k)^T] = w_k S_k, so each statistic is
    a mean of per-sample terms whose standard error is known from the sample."""
    x = x.double()
    r = MIXTURE.responsibilities(x)
    terms, targets = [r], [MIXTURE.w.expand(len(x), -1)]
    for k in range(3):
        d = x - MIXTURE.m[k]
        terms += [r[:, k : k + 1] * d, (r[:, k, None, None] * d[:, :, None] * d[:, None, :]).flatten(1)[:, [0, 1, 3]]]
        targets += [torch.zeros(len(x), 2, dtype=torch.float64), (MIXTURE.w[k] * MIXTURE.S[k]).flatten()[[0, 1, 3]].expand(len(x), -1)]
    terms, targets = torch.cat(terms, 1), torch.cat(targets, 1)
    return (terms.mean(0) - targets[0]) / (terms.std(0) / len(x) ** 0.5)


class FullGaussianDenoiser(Denoiser):
    """A denoiser whose eps is exact for data x_0 ~ N(m, S) with a full covariance S over the flattened example
    (e.g. [B, 1, 2, 2] images: 4 dimensions): x_t ~ N(alpha m, C), C = alpha^2 S + sigma^2 I, so
    E[eps | x_t] = sigma C^{-1} (x_t - alpha m) (float64 inside)."""

    def __init__(self, mean, cov, schedule):
        super().__init__(nn.Identity(), schedule)
        self.m = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.S = torch.as_tensor(cov, dtype=torch.float64)

    def eps(self, x, t, **cond):
        alpha = self.schedule.alpha(t).double()[:, None]
        sigma = self.schedule.sigma(t).double()[:, None]
        flat = x.double().flatten(1)
        C = alpha[:, :, None] ** 2 * self.S + sigma[:, :, None] ** 2 * torch.eye(len(self.m), dtype=torch.float64)
        e = sigma * torch.linalg.solve(C, (flat - alpha * self.m)[..., None])[..., 0]
        return e.reshape(x.shape).to(x.dtype)

    def conditional(self, known: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the dimensions where `keep` (flat bool) is False given the others = `known`."""
        u, k = ~keep, keep
        S_uk, S_kk = self.S[u][:, k], self.S[k][:, k]
        gain = S_uk @ torch.linalg.inv(S_kk)
        mean = self.m[u] + gain @ (known.double().flatten()[k] - self.m[k])
        return mean, self.S[u][:, u] - gain @ S_uk.T
