"""FID / IS arithmetic against closed forms and an independent computation (scipy's sqrtm)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from ddpm_lightning import metrics as M
from ddpm_lightning.data.digits import load_digits_uint8


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + d * np.eye(d)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_gaussians_equals_closed_form():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s.
    assert M.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 16.0]), np.array([9.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, -2.0])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    # General covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric square roots.
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    r = _sqrt_psd(s1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sqrt_psd(r @ s2 @ r))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-10)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_features_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)))
    y = torch.from_numpy(rng.standard_normal((300, 24)) * 1.5 + 0.3)
    ours = M.compute_metrics(["fid"], {"64": x}, {"64": y}, feature="64")["fid"]
    mx, my = x.numpy().mean(0), y.numpy().mean(0)
    cx, cy = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    covmean = linalg.sqrtm(cx @ cy).real
    independent = np.sum((mx - my) ** 2) + np.trace(cx + cy - 2 * covmean)
    assert ours == pytest.approx(independent, rel=1e-8)


def test_fid_zero_for_same_set_and_grows_with_shift_and_blur():
    """FID on pixel features of the digits: 0 for the same set, exactly D delta^2 for a shift, growing with blur."""
    images = load_digits_uint8(8)[0][:600].float() / 255
    def fid(a, b):
        return M.compute_metrics(["fid"], {"64": a.flatten(1).double()}, {"64": b.flatten(1).double()}, feature="64")["fid"]
    assert fid(images, images) == pytest.approx(0.0, abs=1e-8)
    assert fid(images, images + 0.1) == pytest.approx(64 * 0.1**2, rel=1e-6)

    def blur(x, sigma):
        k = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).double()
        x = F.conv2d(F.pad(x.double(), (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
        return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    values = [fid(images, blur(images, s)) for s in (0.5, 1.0, 2.0)]
    assert 0 < values[0] < values[1] < values[2]


def test_inception_score_closed_forms():
    """IS = exp(E KL(p(y|x) || p(y))): 1 when every image gets the same class distribution, K for confident
    predictions spread evenly over K classes (Salimans et al. 2016)."""
    same = torch.randn(1, 1008).repeat(50, 1)
    assert M.compute_metrics(["isc"], {"logits_unbiased": same}, None, isc_splits=1)["isc"] == pytest.approx(1.0, rel=1e-6)
    confident = torch.zeros(50, 1008)
    confident[torch.arange(50), torch.arange(50) % 5] = 60.0
    assert M.compute_metrics(["isc"], {"logits_unbiased": confident}, None, isc_splits=1)["isc"] == pytest.approx(5.0, rel=1e-6)


def test_kid_near_zero_for_one_distribution_and_large_for_shifted():
    rng = np.random.default_rng(2)
    x, y = (torch.from_numpy(rng.standard_normal((200, 16))).float() for _ in range(2))
    same = M.compute_metrics(["kid"], {"64": x}, {"64": y}, kid_subsets=20, kid_subset_size=100, feature="64")["kid"]
    shifted = M.compute_metrics(["kid"], {"64": x}, {"64": y + 1}, kid_subsets=20, kid_subset_size=100, feature="64")["kid"]
    assert abs(same) < 0.05 * shifted


def test_metric_names_are_checked():
    with pytest.raises(ValueError, match="unknown \\['fud'\\]"):
        M.check_metric_names(["fid", "fud"])
    assert M.check_metric_names(["nll", "fid"]) == ["nll", "fid"]
    with pytest.raises(ValueError, match="inception.feature=100"):
        M.features_for(["fid"], "100")
