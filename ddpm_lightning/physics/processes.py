"""From a random walk to a diffusion model: the physics DDPM comes from, as small runnable equations (float64).

A particle on a 1-D lattice (spacing delta, time step tau) jumps left with probability p and right with
probability q, else stays. Its occupation probabilities obey the master equation

    C_i(t + tau) = q C_{i-1}(t) + p C_{i+1}(t) + (1 - p - q) C_i(t)
                 = C_i + (p - q)/2 (C_{i+1} - C_{i-1}) + (p + q)/2 (C_{i+1} - 2 C_i + C_{i-1}),

a drift term plus a diffusion term. In the continuum limit it becomes dC/dt = -v dC/dx + D d2C/dx2 with
v = (q - p) delta / tau and D = (p + q) delta^2 / (2 tau), solved by a Gaussian of variance 2 D t (Fourier:
dF/dt = -D k^2 F), so the mean squared displacement grows as 2 D t. With a position-dependent drift A and
diffusion B it is the Fokker-Planck equation df/dt = -d/dx (A f) + d2/dx2 (B f), here for the Ito SDE
dx = A dt + g dW with a standard Wiener process W (Var dW = dt), so **B = g^2 / 2** (Gardiner 2009); writing
B = g^2 doubles every variance. The Ornstein-Uhlenbeck process dx = -gamma x dt + sigma dW is its simplest
non-trivial case, with stationary density N(0, sigma^2 / (2 gamma)). DDPM's forward process is the VP SDE
dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW (Song et al. 2021 eq. 11), an OU process with time-varying
coefficients, whose marginal from x_0 is N(alpha(t) x_0, sigma(t)^2); it runs backwards with the score
(Anderson 1982; Song et al. 2021 eqs. 6 and 13). `vp_sde` reads the SDE of any of our schedules from
`schedule.sde`, so everything below applies to the framework's own forward processes.

`python -m ddpm_lightning.physics.figures --out docs/physics` draws the figures of README "From a random walk
to DDPM" with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Coefficient = Callable[[np.ndarray, float], np.ndarray]  # (x [n], t) -> value at each x


# ---------------------------------------------------------------------------------------------------------
# The lattice random walk and its master equation


def lattice_random_walk(
    n_particles: int, n_steps: int, p: float, q: float, delta: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Positions [n_steps + 1, n_particles] of independent walkers started at 0: each step moves -delta with
    probability p, +delta with probability q, and stays otherwise (row k is time k tau)."""
    _check_pq(p, q)
    u = np.random.default_rng(seed).random((n_steps, n_particles), dtype=np.float32)
    jumps = (u >= 1 - q).astype(np.int32) - (u < p).astype(np.int32)  # p and q are disjoint (p + q <= 1)
    x = np.zeros((n_steps + 1, n_particles), dtype=np.int64)
    np.cumsum(jumps, axis=0, out=x[1:])
    return x * float(delta)


def diffusion_coefficient(p: float, q: float, delta: float = 1.0, tau: float = 1.0) -> float:
    """D = delta^2 D~ / (2 tau) with D~ = p + q: the continuum limit of the master equation's diffusion term."""
    return (p + q) * delta**2 / (2 * tau)


def drift_velocity(p: float, q: float, delta: float = 1.0, tau: float = 1.0) -> float:
    """v = (q - p) delta / tau: the mean position moves right at this speed when q > p."""
    return (q - p) * delta / tau


def mean_squared_displacement(positions: np.ndarray) -> np.ndarray:
    """<x(t)^2> over the particles (axis 1), for walkers started at 0."""
    return np.mean(np.square(positions), axis=1)


def fit_slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y = s t through the origin (for MSD = 2 D t, s = 2 D)."""
    t, y = np.asarray(t, np.float64), np.asarray(y, np.float64)
    return float(np.dot(t, y) / np.dot(t, t))


def master_equation_step(C: np.ndarray, p: float, q: float) -> np.ndarray:
    """One step of C_i(t + tau) = C_i + (p - q)/2 (C_{i+1} - C_{i-1}) + (p + q)/2 (C_{i+1} - 2 C_i + C_{i-1})
    (= q C_{i-1} + p C_{i+1} + (1 - p - q) C_i) on a periodic lattice, so no probability leaves it."""
    right, left = np.roll(C, -1), np.roll(C, 1)  # C_{i+1}, C_{i-1}
    return C + (p - q) / 2 * (right - left) + (p + q) / 2 * (right - 2 * C + left)


def master_equation(C0: np.ndarray, p: float, q: float, n_steps: int) -> np.ndarray:
    """The exact occupation probabilities [n_steps + 1, n_sites] of the random walk, from C0 (periodic lattice:
    make it wider than the walk's reach, 2 n_steps + 1 sites, for the free walk)."""
    _check_pq(p, q)
    C = np.empty((n_steps + 1, len(C0)))
    C[0] = C0
    for k in range(n_steps):
        C[k + 1] = master_equation_step(C[k], p, q)
    return C


def gaussian_solution(x: np.ndarray, t: float, D: float, v: float = 0.0, x0: float = 0.0) -> np.ndarray:
    """C(x, t) = exp(-(x - x0 - v t)^2 / 4Dt) / sqrt(4 pi D t): the diffusion (with drift v) equation's solution
    from a point mass at x0."""
    return np.exp(-np.square(x - x0 - v * t) / (4 * D * t)) / math.sqrt(4 * math.pi * D * t)


def _check_pq(p: float, q: float) -> None:
    if not (0 <= p <= 1 and 0 <= q <= 1 and p + q <= 1):
        raise ValueError(f"jump probabilities p={p}, q={q} must be in [0, 1] with p + q <= 1")


# ---------------------------------------------------------------------------------------------------------
# The Fokker-Planck equation and the matching SDE


def fokker_planck_operator(x: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The finite-volume matrix M of df/dt = -d/dx (A f) + d2/dx2 (B f) on cells centred at x (uniform width h):
    flux J_{i+1/2} = A_{i+1/2} (f_i + f_{i+1}) / 2 - ((B f)_{i+1} - (B f)_i) / h, zero at both ends, so every
    column of M sums to 0 and the mass h sum_i f_i is conserved. Returned banded ([3, n], scipy's layout)."""
    h = x[1] - x[0]
    n = len(x)
    a = (A[:-1] + A[1:]) / 2  # A at the interfaces
    M = np.zeros((3, n))  # rows: super-diagonal, diagonal, sub-diagonal; M[1 + i - j, j] = M_ij
    # df_i/dt = (J_{i-1/2} - J_{i+1/2}) / h
    # J_{i+1/2} depends on f_i with a/2 + B_i/h and on f_{i+1} with a/2 - B_{i+1}/h.
    c_i = (a / 2 + B[:-1] / h) / h  # coefficient of f_i in J_{i+1/2} / h, i = 0..n-2
    c_next = (a / 2 - B[1:] / h) / h  # coefficient of f_{i+1} in J_{i+1/2} / h
    M[1, :-1] -= c_i  # -J_{i+1/2}: row i, column i
    M[0, 1:] -= c_next  # row i, column i + 1
    M[2, :-1] += c_i  # +J_{i+1/2} into cell i + 1: row i + 1, column i
    M[1, 1:] += c_next  # row i + 1, column i + 1
    return M


def fokker_planck(
    f0: np.ndarray, x: np.ndarray, A: Coefficient, B: Coefficient, times: Sequence[float], dt: float
) -> np.ndarray:
    """Solve df/dt = -d/dx (A(x, t) f) + d2/dx2 (B(x, t) f) (the Fokker-Planck equation; for dx = A dt + g dW,
    B = g^2 / 2) from f(times[0]) = f0 on the uniform cell centres x, zero flux at the ends. Crank-Nicolson in
    time with the coefficients at each step's midpoint; returns f at every time in `times` [len(times), n]."""
    from scipy.linalg import solve_banded

    x, f = np.asarray(x, np.float64), np.asarray(f0, np.float64).copy()
    if dt <= 0:
        raise ValueError(f"dt={dt} must be positive")
    out = [f.copy()]
    for t0, t1 in zip(times[:-1], times[1:]):
        n_steps = max(1, math.ceil(abs(t1 - t0) / dt - 1e-9))
        h = (t1 - t0) / n_steps
        for k in range(n_steps):
            tm = t0 + (k + 0.5) * h
            M = fokker_planck_operator(x, np.broadcast_to(A(x, tm), x.shape), np.broadcast_to(B(x, tm), x.shape))
            lhs = -h / 2 * M
            lhs[1] += 1
            rhs = f + h / 2 * _banded_matvec(M, f)
            f = solve_banded((1, 1), lhs, rhs)
        out.append(f.copy())
    return np.stack(out)


def _banded_matvec(M: np.ndarray, f: np.ndarray) -> np.ndarray:
    y = M[1] * f
    y[:-1] += M[0, 1:] * f[1:]
    y[1:] += M[2, :-1] * f[:-1]
    return y


def fokker_planck_coefficients(drift: Coefficient, g: Coefficient) -> tuple[Coefficient, Coefficient]:
    """(A, B) of the Fokker-Planck equation of the Ito SDE dx = drift dt + g dW: A = drift, B = g^2 / 2."""
    return drift, lambda x, t: 0.5 * np.square(g(x, t))


def euler_maruyama(
    x0: np.ndarray, drift: Coefficient, g: Coefficient, t0: float, t1: float, n_steps: int, seed: int = 0
) -> np.ndarray:
    """Euler-Maruyama (Kloeden & Platen 1992) for dx = drift(x, t) dt + g(x, t) dW from t0 to t1:
    x <- x + drift dt + g sqrt(|dt|) z. t1 < t0 integrates backwards in time (a reverse-time SDE, whose
    drift then already contains the score term)."""
    rng = np.random.default_rng(seed)
    x = np.array(x0, dtype=np.float64)
    dt = (t1 - t0) / n_steps
    for k in range(n_steps):
        t = t0 + k * dt
        x = x + drift(x, t) * dt + g(x, t) * math.sqrt(abs(dt)) * rng.standard_normal(x.shape)
    return x


def density_histogram(samples: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A normalised histogram of samples on the cells centred at x (for comparison with a density there)."""
    h = x[1] - x[0]
    edges = np.concatenate([x - h / 2, x[-1:] + h / 2])
    counts, _ = np.histogram(samples, bins=edges)
    return counts / (len(samples) * h)


def l1_distance(f: np.ndarray, g: np.ndarray, x: np.ndarray) -> float:
    """int |f - g| dx on the uniform grid x."""
    return float(np.sum(np.abs(f - g)) * (x[1] - x[0]))


# ---------------------------------------------------------------------------------------------------------
# The Ornstein-Uhlenbeck process dx = -gamma x dt + sigma dW


def ou_mean(x0: float | np.ndarray, t: float, gamma: float) -> float | np.ndarray:
    """E[x_t] = x0 exp(-gamma t)."""
    return x0 * np.exp(-gamma * t)


def ou_variance(t: float, gamma: float, sigma: float, var0: float = 0.0) -> float:
    """Var[x_t] = sigma^2 / (2 gamma) (1 - exp(-2 gamma t)) + var0 exp(-2 gamma t)."""
    decay = math.exp(-2 * gamma * t)
    return sigma**2 / (2 * gamma) * (1 - decay) + var0 * decay


def ou_stationary_density(x: np.ndarray, gamma: float, sigma: float) -> np.ndarray:
    """The stationary density N(0, sigma^2 / (2 gamma)) of the OU process."""
    return normal_density(x, 0.0, sigma**2 / (2 * gamma))


def normal_density(x: np.ndarray, mean: float | np.ndarray, var: float | np.ndarray) -> np.ndarray:
    """N(x; mean, var)."""
    return np.exp(-np.square(x - mean) / (2 * var)) / np.sqrt(2 * math.pi * var)


# ---------------------------------------------------------------------------------------------------------
# DDPM's forward process as an SDE, its marginals and its reversal


def vp_sde(schedule) -> tuple[Coefficient, Coefficient]:
    """(drift(x, t), g(x, t)) over float64 numpy arrays of one of our schedules' SDE (`schedule.sde`: the VP SDE
    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW of Song et al. 2021 eq. 11, or the discrete DDPM schedules in
    index time, whose marginal at index i is Ho et al.'s eq. 4; they start from the data at t = -1)."""

    def call(x: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        xt = torch.as_tensor(np.asarray(x, np.float64)).reshape(-1)
        f, g = schedule.sde(xt, torch.full_like(xt, float(t)))
        shape = np.shape(x)
        return f.double().numpy().reshape(shape), g.double().numpy().reshape(shape)

    return (lambda x, t: call(x, t)[0]), (lambda x, t: call(x, t)[1])


def marginal_scales(schedule, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) of the schedule's closed-form marginal x_t = alpha x_0 + sigma eps."""
    tt = torch.tensor([float(t)], dtype=torch.float64)
    return float(schedule.alpha(tt)[0]), float(schedule.sigma(tt)[0])


def mixture_density(x: np.ndarray, weights, means, stds, alpha: float = 1.0, sigma: float = 0.0) -> np.ndarray:
    """p_t(x) = sum_k w_k N(x; alpha m_k, alpha^2 s_k^2 + sigma^2): a 1-D Gaussian mixture pushed through
    x_t = alpha x_0 + sigma eps (Ho et al. eq. 4 for DDPM)."""
    w, m, s = (np.asarray(v, np.float64) for v in (weights, means, stds))
    var = alpha**2 * s**2 + sigma**2
    return np.sum(w * normal_density(np.asarray(x)[..., None], alpha * m, var), axis=-1)


def mixture_score(x: np.ndarray, weights, means, stds, alpha: float, sigma: float) -> np.ndarray:
    """The exact score d/dx log p_t(x) of that marginal: sum_k r_k(x) (alpha m_k - x) / v_k with the
    responsibilities r_k = w_k N_k / p_t and v_k = alpha^2 s_k^2 + sigma^2."""
    w, m, s = (np.asarray(v, np.float64) for v in (weights, means, stds))
    x = np.asarray(x, np.float64)[..., None]
    var = alpha**2 * s**2 + sigma**2
    log_n = np.log(w) - 0.5 * np.log(2 * math.pi * var) - np.square(x - alpha * m) / (2 * var)
    r = np.exp(log_n - log_n.max(axis=-1, keepdims=True))
    r /= r.sum(axis=-1, keepdims=True)
    return np.sum(r * (alpha * m - x) / var, axis=-1)


def reverse_sde_drift(drift: Coefficient, g: Coefficient, score: Coefficient) -> Coefficient:
    """Anderson 1982 / Song et al. 2021 eq. 6: the reverse-time SDE dx = [f - g^2 score] dt + g dW-bar."""
    return lambda x, t: drift(x, t) - np.square(g(x, t)) * score(x, t)


def probability_flow_drift(drift: Coefficient, g: Coefficient, score: Coefficient) -> Coefficient:
    """Song et al. 2021 eq. 13: the probability-flow ODE dx/dt = f - 1/2 g^2 score, with the SDE's marginals."""
    return lambda x, t: drift(x, t) - 0.5 * np.square(g(x, t)) * score(x, t)


def heun(x0: np.ndarray, velocity: Coefficient, t0: float, t1: float, n_steps: int) -> np.ndarray:
    """Heun's method (explicit trapezoid, 2nd order) for dx/dt = velocity(x, t) from t0 to t1."""
    x = np.array(x0, dtype=np.float64)
    dt = (t1 - t0) / n_steps
    for k in range(n_steps):
        t = t0 + k * dt
        d = velocity(x, t)
        x_euler = x + dt * d
        x = x + dt / 2 * (d + velocity(x_euler, t + dt))
    return x


def mixture_score_of(schedule, weights, means, stds) -> Coefficient:
    """score(x, t) of the schedule's marginal of the 1-D mixture, for `reverse_sde_drift` / `probability_flow_drift`."""

    def score(x: np.ndarray, t: float) -> np.ndarray:
        alpha, sigma = marginal_scales(schedule, t)
        return mixture_score(x, weights, means, stds, alpha, sigma)

    return score
