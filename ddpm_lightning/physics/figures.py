"""The figures of README "From a random walk to DDPM", drawn with ddpm_lightning.physics.processes:

    python -m ddpm_lightning.physics.figures --out docs/physics

writes 1_random_walk.png ... 5_reverse.png and numbers.json (the measured slopes and L1 errors) in --out.
Seeded: the same command draws the same figures. About a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_lightning.diffusion import schedules as S
from ddpm_lightning.physics import processes as P

# The 1-D two-mode data density of figures 4 and 5 (as in tests/test_physics.py).
W, M, SD = [0.3, 0.7], [-0.6, 0.5], [0.1, 0.15]
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write a figure as a small PNG (a 256-colour palette keeps each under 100 KB for the repository)."""

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    with Image.open(path) as im:
        im.convert("RGB").quantize(256).save(path, optimize=True)


def random_walk(out: Path) -> dict:
    """(1) Histograms of 20,000 walkers against the master equation and the Gaussian at several times."""
    plt = _plt()
    p = q = 0.3
    n = 200
    x = P.lattice_random_walk(20_000, n, p, q, seed=0)
    C0 = np.zeros(2 * n + 1)
    C0[n] = 1
    C = P.master_equation(C0, p, q, n)
    sites = np.arange(-n, n + 1)
    D = P.diffusion_coefficient(p, q)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.0))
    l1 = {}
    for ax, k in zip(axes, (5, 40, 200)):
        counts = np.bincount((x[k] + n).astype(int), minlength=2 * n + 1) / x.shape[1]
        reach = int(4 * np.sqrt(2 * D * k)) + 2
        sl = slice(n - reach, n + reach + 1)
        ax.bar(sites[sl], counts[sl], width=1.0, color="0.8", label="20,000 walkers")
        ax.plot(sites[sl], C[k][sl], "o", ms=3, color="C0", label="master equation")
        xs = np.linspace(-reach, reach, 400)
        ax.plot(xs, P.gaussian_solution(xs, k, D), color="C3", lw=1.2, label="Gaussian, 4Dt")
        l1[k] = float(np.abs(C[k] - P.gaussian_solution(sites, k, D)).sum())
        ax.set_title(f"t = {k} tau   (L1 master-Gaussian {l1[k]:.1e})", fontsize=9)
        ax.set_xlabel("x / delta")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"lattice random walk, p = q = {p}: D = (p + q) delta^2 / (2 tau) = {D:g}", fontsize=10)
    _save(fig, out / "1_random_walk.png")
    return {"p": p, "q": q, "D": D, "l1_master_vs_gaussian": l1}


def msd(out: Path) -> dict:
    """(2) Mean squared displacement against t with the fitted slope 2D, and the drift (q - p) delta / tau."""
    plt = _plt()
    n, delta, tau = 200, 1.0, 1.0
    t = np.arange(n + 1) * tau
    p = q = 0.3
    x = P.lattice_random_walk(50_000, n, p, q, delta, seed=0)
    m = P.mean_squared_displacement(x)
    slope, D = P.fit_slope(t, m), P.diffusion_coefficient(p, q, delta, tau)
    pd, qd = 0.2, 0.4
    xd = P.lattice_random_walk(50_000, n, pd, qd, delta, seed=1)
    v_fit, v = P.fit_slope(t, xd.mean(axis=1)), P.drift_velocity(pd, qd, delta, tau)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(t, m, color="C0", lw=2, label="<x^2>, 50,000 walkers")
    a.plot(t, slope * t, "--", color="C3", label=f"fit: slope {slope:.4f}")
    a.set(xlabel="t / tau", ylabel="mean squared displacement", title=f"p = q = {p}: 2D = {2 * D:.4f}")
    a.legend(fontsize=8)
    b.plot(t, xd.mean(axis=1), color="C0", lw=2, label="<x>")
    b.plot(t, v * t, "--", color="C3", label=f"(q - p) delta / tau = {v:.2f}")
    b.set(xlabel="t / tau", ylabel="mean position", title=f"p = {pd}, q = {qd}: fitted v = {v_fit:.4f}")
    b.legend(fontsize=8)
    _save(fig, out / "2_msd.png")
    return {"msd_slope": slope, "2D": 2 * D, "msd_slope_rel_error": slope / (2 * D) - 1, "drift_fit": v_fit, "drift": v}


def ornstein_uhlenbeck(out: Path) -> dict:
    """(3) OU from N(2, 0.05): Fokker-Planck solution, Euler-Maruyama histogram and closed form, converging to
    the stationary N(0, sigma^2 / (2 gamma))."""
    plt = _plt()
    gamma, sigma, x0, var0 = 1.0, 0.8, 2.0, 0.05
    x = np.linspace(-4, 4, 801)
    times = [0.0, 0.2, 0.5, 1.0, 2.0, 12.0]
    drift, g = (lambda y, t: -gamma * y), (lambda y, t: sigma + 0 * y)
    F = P.fokker_planck(P.normal_density(x, x0, var0), x, *P.fokker_planck_coefficients(drift, g), times, 0.01)
    samples = x0 + np.sqrt(var0) * np.random.default_rng(0).standard_normal(50_000)
    coarse = x[::10]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    l1_closed, l1_em = {}, {}
    for k, (t, f) in enumerate(zip(times, F)):
        if k:
            n_steps = max(1, round((t - times[k - 1]) / 0.01))
            samples = P.euler_maruyama(samples, drift, g, times[k - 1], t, n_steps, seed=k)
        exact = P.normal_density(x, P.ou_mean(x0, t, gamma), P.ou_variance(t, gamma, sigma, var0))
        hist = P.density_histogram(samples, coarse)
        l1_closed[t], l1_em[t] = P.l1_distance(f, exact, x), P.l1_distance(hist, f[::10], coarse)
        ax.stairs(hist, np.concatenate([coarse - 0.05, coarse[-1:] + 0.05]), color=f"C{k}", alpha=0.5)
        ax.plot(x, f, color=f"C{k}", lw=1.5, label=f"t = {t:g}")
        ax.plot(x, exact, "k:", lw=0.8)
    stationary = P.ou_stationary_density(x, gamma, sigma)
    ax.plot(x, stationary, "k--", lw=1.2, label="N(0, sigma^2/2gamma)")
    title = f"OU, gamma = {gamma}, sigma = {sigma}: Fokker-Planck (lines), Euler-Maruyama (steps), closed form (dotted)"
    ax.set(xlabel="x", ylabel="density", ylim=(0, 1.9), title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out / "3_ornstein_uhlenbeck.png")
    return {
        "gamma": gamma, "sigma": sigma,
        "l1_fp_vs_closed_form": l1_closed, "l1_em_histogram_vs_fp": l1_em,
        "l1_fp_vs_stationary_t12": P.l1_distance(F[-1], stationary, x),
        "fp_mass_error": float(np.abs(F.sum(1) * (x[1] - x[0]) - 1).max()),
    }


def forward_vp(out: Path) -> dict:
    """(4) DDPM's forward process (linear schedule, in index time) carrying the two-mode density to N(0, 1):
    the Fokker-Planck solution as a heat map, checked against the schedule's closed-form marginal."""
    plt = _plt()
    schedule = S.linear()
    x = np.linspace(-4, 4, 801)
    times = [-1.0, *np.linspace(0, 999, 112)]
    A, B = P.fokker_planck_coefficients(*P.vp_sde(schedule))
    F = P.fokker_planck(P.mixture_density(x, W, M, SD), x, A, B, times, 1.0)
    l1 = [P.l1_distance(f, P.mixture_density(x, W, M, SD, *P.marginal_scales(schedule, t)), x) for f, t in zip(F[1:], times[1:])]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(np.sqrt(F.T), origin="lower", aspect="auto", extent=(times[0], times[-1], x[0], x[-1]), cmap="magma")
    title = f"forward VP diffusion p_t(x) (sqrt scale), linear schedule: max L1 to closed form {max(l1):.1e}"
    ax.set(xlabel="DDPM step t", ylabel="x", title=title)
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax, label="sqrt p_t(x)")
    _save(fig, out / "4_forward_vp.png")
    return {"schedule": "linear", "max_l1_fp_vs_closed_form": max(l1), "mass_error": float(np.abs(F.sum(1) * (x[1] - x[0]) - 1).max())}


def reverse(out: Path) -> dict:
    """(5) The reverse SDE and the probability-flow ODE with the exact score carry N(0, 1) back to the two modes."""
    plt = _plt()
    schedule = S.linear()
    f, g = P.vp_sde(schedule)
    score = P.mixture_score_of(schedule, W, M, SD)
    x_T = np.random.default_rng(0).standard_normal(5000) * P.marginal_scales(schedule, 999)[1]
    grid = np.linspace(999, 0, 41)
    paths = {"reverse SDE": [x_T], "probability-flow ODE": [x_T]}
    for k, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
        paths["reverse SDE"].append(P.euler_maruyama(paths["reverse SDE"][-1], P.reverse_sde_drift(f, g, score), g, t0, t1, 25, seed=k))
        paths["probability-flow ODE"].append(P.heun(paths["probability-flow ODE"][-1], P.probability_flow_drift(f, g, score), t0, t1, 5))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2, 2, 1.3]})
    xs = np.linspace(-1.5, 1.5, 300)
    numbers = {}
    for ax, (name, path) in zip(axes, paths.items()):
        path = np.stack(path)
        ax.plot(grid, path[:, :30], lw=0.6, alpha=0.7)
        ax.set(xlabel="DDPM step t (integrated from 999 down to 0)", ylabel="x", title=name, xlim=(999, 0), ylim=(-3, 3))
        end = path[-1]
        left = end < (M[0] + M[1]) / 2
        numbers[name] = {"weight_left": float(left.mean()), "mean_left": float(end[left].mean()), "mean_right": float(end[~left].mean())}
        axes[2].hist(end, bins=np.linspace(-1.5, 1.5, 61), density=True, histtype="step", lw=1.2, label=name)
    axes[2].plot(xs, P.mixture_density(xs, W, M, SD), "k--", lw=1, label="data")
    axes[2].set(xlabel="x", title="x_0 of 5,000 samples")
    axes[2].legend(fontsize=7)
    _save(fig, out / "5_reverse.png")
    return {"schedule": "linear", "data": {"weights": W, "means": M, "stds": SD}, **numbers}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/physics", help="folder for the PNGs and numbers.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {f.__name__: f(out) for f in (random_walk, msd, ornstein_uhlenbeck, forward_vp, reverse)}
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2, default=float))
    print(json.dumps(numbers, indent=2, default=float))
    return numbers


if __name__ == "__main__":
    main()
