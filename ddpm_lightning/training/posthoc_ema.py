"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
App. C): during training, power-function EMAs of the weights for a few widths sigma_rel are tracked and their
snapshots written every few steps (`PostHocEMA`); after training, the EMA of any other width is reconstructed as the
linear combination of the snapshots whose averaging profile is closest, in L2, to the wanted one (`reconstruct`,
`write_checkpoint`). The command is `python -m ddpm_lightning.posthoc_ema`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.checkpointing import AtomicCheckpointIO, load_file, read_checkpoint

log = logging.getLogger(__name__)

# sigma_rel^2 = u / ((u + 1)^2 (u + 2)) with u = gamma + 1 > 0 is largest at u^2 + u = 1: the widest power-function
# profile. Below it each sigma_rel has two exponents; the larger one (the profile rising towards the present) is used.
_U_WIDEST = (math.sqrt(5) - 1) / 2
SIGMA_REL_MAX = math.sqrt(_U_WIDEST / ((_U_WIDEST + 1) ** 2 * (_U_WIDEST + 2)))  # 0.3003
SNAPSHOT_GLOB = "snapshot_*.pt"


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
    on [0, t] (Karras et al. 2024, App. C.1): sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    if not gamma > -1:
        raise ValueError(f"the exponent gamma={gamma} of a power-function EMA must exceed -1")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float, key: str = "sigma_rel") -> float:
    """The exponent gamma of the power-function EMA of width `sigma_rel`: the largest real root > -1 of
    (gamma + 2)^2 (gamma + 3) sigma_rel^2 - (gamma + 1) = 0 (Karras et al. 2024, App. C.1), e.g. 0.05 -> 16.97."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"{key}={sigma_rel!r}: the relative width of a power-function EMA lies in (0, {SIGMA_REL_MAX:.4f}) "
            "(the widest profile has gamma = (sqrt(5) - 3) / 2)"
        )
    s2 = float(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])  # (g^3 + 7 g^2 + 16 g + 12) s^2 - g - 1
    real = roots[np.abs(roots.imag) < 1e-6].real  # near the widest profile a double root, split by rounding
    return float(real[real > -1].max())


def profile_dot(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
    """<p_a, p_b>: the integral over [0, min(t_a, t_b)] of the product of two power-function profiles,
    (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)) with m = min(t_a, t_b);
    computed in float64 through logarithms (t^(gamma + 1) overflows for long runs), broadcasting over arrays."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m) - np.log(g_a + g_b + 1)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_weights(snapshot_times: Sequence[float], snapshot_gammas: Sequence[float], target_time: float, target_gamma: float) -> np.ndarray:
    """The coefficients x of the snapshots whose combination sum_i x_i p_i is the least-squares (L2) fit of the
    target profile: A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (Karras et al. 2024, App. C.3), float64;
    then scaled to sum to 1, as the weights of an average do (a fit from few snapshots is off by a few percent,
    which would scale the reconstructed weights)."""
    t, g = np.asarray(snapshot_times, np.float64), np.asarray(snapshot_gammas, np.float64)
    if t.shape != g.shape or t.ndim != 1 or not len(t):
        raise ValueError("solve_weights needs one time and one exponent per snapshot")
    A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, target_time, target_gamma)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


def tracked_tensors(net: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors a post-hoc EMA averages, by state_dict key: the trainable floating-point parameters and the
    floating-point buffers (frozen parameters, e.g. a ControlNet's locked base, are equal in every average)."""
    out = {}
    for k, v in net.state_dict(keep_vars=True).items():
        if v.is_floating_point() and (v.requires_grad if isinstance(v, torch.nn.Parameter) else True):
            out[k] = v.detach()
    return out


class PostHocEMA(L.Callback):
    """Post-hoc EMA (Karras et al. 2024, Sec. 3): one power-function EMA of the network's weights per `sigma_rels`
    width, updated after every optimizer step t (t = trainer.global_step) as ema <- beta_t ema + (1 - beta_t) theta
    with beta_t = (1 - 1/t)^(gamma + 1). Every `every_n_steps` steps and at the end of training rank 0 writes a
    snapshot of them, `<dirpath>/snapshot_<step>.pt` (default dirpath: the run directory's `posthoc_ema/`), from
    which `python -m ddpm_lightning.posthoc_ema` reconstructs the EMA of any width. The averages and their step
    are kept in the checkpoint, so a resumed run continues them exactly."""

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), every_n_steps: int = 1000, dirpath: str | None = None):
        sigma_rels = list(sigma_rels or [])
        if not sigma_rels:
            raise ValueError("callbacks.posthoc_ema.sigma_rels: give at least one width, e.g. [0.05, 0.10]")
        self.gammas = [sigma_rel_to_gamma(s, "callbacks.posthoc_ema.sigma_rels") for s in sigma_rels]
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps!r} must be a non-negative integer (0: at the end of training only)")
        self.sigma_rels, self.every_n_steps, self.dirpath = [float(s) for s in sigma_rels], every_n_steps, dirpath
        self.step = 0  # the optimizer steps averaged so far
        self.emas: list[dict[str, Tensor]] | None = None
        self._written = -1  # the step of the last snapshot written

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_rels=self.sigma_rels)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = str(self.dirpath or Path(trainer.default_root_dir) / "posthoc_ema")
        self._trainer, self._module = trainer, pl_module

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance(trainer, pl_module)

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The work of the optimizer step just taken, done once: the update, and the snapshot when one is due. Also
        called by `state_dict` for a checkpoint written by a callback that runs before this one at the same step."""
        t = trainer.global_step
        if t == self.step:  # done already, or no optimizer step since the last batch (gradient accumulation)
            return
        self.update(tracked_tensors(pl_module.net), t)
        if self.every_n_steps and t % self.every_n_steps == 0:
            self.save_snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.emas is not None and self.step != self._written:
            self.save_snapshot(trainer)

    def update(self, current: dict[str, Tensor], t: int) -> None:
        """Average the weights of optimizer step t into every EMA (one fused lerp per profile)."""
        if self.emas is None:
            if t > 1:
                log.warning("post-hoc EMA starts at step %d without a saved state: it counts the weights before as "
                            "those of step %d", t, t)
            self.emas = [{k: v.clone() for k, v in current.items()} for _ in self.gammas]
        else:
            self._to(current)
        for ema, gamma in zip(self.emas, self.gammas):
            beta = (1 - 1 / t) ** (gamma + 1)
            torch._foreach_lerp_(list(ema.values()), [current[k] for k in ema], 1 - beta)
        self.step = t

    def _to(self, current: dict[str, Tensor]) -> None:
        """After a resume: the loaded averages checked against the network and moved to its device."""
        first = self.emas[0]
        if first.keys() != current.keys() or any(first[k].shape != v.shape for k, v in current.items()):
            raise ValueError("the checkpoint's post-hoc EMA state belongs to another network than the one trained")
        if any(first[k].device != v.device for k, v in current.items()):
            self.emas = [{k: v.to(current[k].device) for k, v in ema.items()} for ema in self.emas]

    def snapshot(self) -> dict[str, Any]:
        """The averages at the current step as plain data (CPU tensors), as written to the snapshot files."""
        states = [{k: v.detach().to("cpu", copy=True) for k, v in ema.items()} for ema in self.emas or []]
        return {"step": self.step, "gammas": list(self.gammas), "sigma_rels": list(self.sigma_rels), "states": states}

    def save_snapshot(self, trainer: L.Trainer) -> None:
        self._written = self.step
        if trainer.is_global_zero:  # written to a temporary file and renamed: a kill never leaves half a snapshot
            AtomicCheckpointIO().save_checkpoint(self.snapshot(), Path(self.dirpath) / f"snapshot_{self.step:07d}.pt")

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.training:  # the averages at the step the checkpoint is written at
            self._advance(trainer, self._module)
        return self.snapshot()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint's post-hoc EMA tracks sigma_rels={state_dict['sigma_rels']}, this run {self.sigma_rels}")
        self.step = self._written = int(state_dict["step"])
        self.emas = [dict(s) for s in state_dict["states"]] if self.step else None


def snapshot_files(path: str | Path) -> list[Path]:
    """The snapshot files of a run directory (its posthoc_ema/) or of a snapshot directory, oldest first."""
    path = Path(path)
    folder = path / "posthoc_ema" if (path / "posthoc_ema").is_dir() else path
    files = sorted(folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"{path}: no post-hoc EMA snapshots ({folder}/{SNAPSHOT_GLOB}); they are written by training with "
            "callbacks=posthoc_ema (or a callbacks.posthoc_ema entry, docs/training.md)"
        )
    return files


def read_snapshots(path: str | Path) -> list[dict[str, Any]]:
    """Every snapshot of `path` (memory-mapped, weights_only), checked: one state per exponent, the same tensors."""
    snapshots = []
    for file in snapshot_files(path):
        s = load_file(file, "the post-hoc EMA snapshots", what="post-hoc EMA snapshot", mmap=True)
        if not isinstance(s, dict) or not {"step", "gammas", "states"} <= s.keys() or len(s["gammas"]) != len(s["states"]):
            raise ValueError(f"{file} is not a post-hoc EMA snapshot (step, gammas and one state per gamma)")
        if snapshots and any(st.keys() != snapshots[0]["states"][0].keys() for st in s["states"]):
            raise ValueError(f"{file} holds other tensors than {snapshot_files(path)[0]}: snapshots of two networks")
        snapshots.append(s)
    return sorted(snapshots, key=lambda s: s["step"])


def reconstruct(path: str | Path, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The network weights of the power-function EMA of width `sigma_rel` at `step` (default: the last snapshot's),
    reconstructed from the snapshots of `path` (a run directory or its posthoc_ema/) up to that step as
    sum_i x_i snapshot_i with x from `solve_weights` (Karras et al. 2024, App. C.3), summed in float64."""
    return _reconstruct(read_snapshots(path), sigma_rel, step)[0]


def _reconstruct(snapshots: list[dict], sigma_rel: float, step: int | None) -> tuple[dict[str, Tensor], int, float]:
    gamma = sigma_rel_to_gamma(sigma_rel)
    last = snapshots[-1]["step"]
    step = last if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= last:
        raise ValueError(f"step={step!r}: reconstruct at a step from 1 to the last snapshot's, {last}")
    used = [s for s in snapshots if s["step"] <= step]
    times = [s["step"] for s in used for _ in s["gammas"]]
    x = solve_weights(times, [g for s in used for g in s["gammas"]], step, gamma)
    states = [st for s in used for st in s["states"]]
    out = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in states[0].items()}
    for coeff, st in zip(x.tolist(), states):
        for k, v in out.items():
            v.add_(st[k].double(), alpha=coeff)
    return {k: v.to(states[0][k].dtype) for k, v in out.items()}, step, gamma


def default_checkpoint_path(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> Path:
    """<run>/checkpoints/posthoc_ema_sigma<sigma_rel>.ckpt (with _step<step> when not the last snapshot's)."""
    suffix = "" if step is None else f"_step{step:07d}"
    return Path(run_dir) / "checkpoints" / f"posthoc_ema_sigma{sigma_rel:.3f}{suffix}.ckpt"


def write_checkpoint(run_dir: str | Path, sigma_rel: float, step: int | None = None, out: str | Path | None = None,
                     template: str | Path | None = None, snapshots: str | Path | None = None, template_step: bool = False) -> Path:
    """Write a checkpoint whose network weights (`state_dict`, the EMA weights `load_model` and `evaluate.py` use)
    are the post-hoc EMA of width `sigma_rel` at `step` (default: the last snapshot's; `template_step`: the
    template's global step). Hyper-parameters and the raw weights (`current_model_state`) come from `template`
    (default: <run>/checkpoints/last.ckpt), the snapshots from `snapshots` (default: <run>/posthoc_ema). Written
    atomically to `out` (default: `default_checkpoint_path`)."""
    run_dir = Path(run_dir)
    template = Path(template) if template else run_dir / "checkpoints" / "last.ckpt"
    sigma_rel_to_gamma(sigma_rel)  # a bad width is refused before any file is read
    found = read_snapshots(snapshots or run_dir)
    ckpt = read_checkpoint(template, key="the template checkpoint")
    weights, step, gamma = _reconstruct(found, sigma_rel, ckpt.get("global_step") if template_step else step)
    state = dict(ckpt["state_dict"])
    for k, v in weights.items():
        old = state.get(f"net.{k}")
        if old is None or old.shape != v.shape:
            raise ValueError(f"the post-hoc EMA snapshots hold net.{k} {tuple(v.shape)}, which {template} does not: "
                             "snapshots and checkpoint of different networks")
        state[f"net.{k}"] = v.to(old.dtype)
    written = {k: ckpt[k] for k in ("hyper_parameters", "epoch", "pytorch-lightning_version") if k in ckpt}
    written.update(state_dict=state, current_model_state=ckpt.get("current_model_state", ckpt["state_dict"]), global_step=step)
    written["posthoc_ema"] = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": step, "template": str(template),
                              "snapshot_steps": [s["step"] for s in found if s["step"] <= step]}
    path = Path(out) if out else default_checkpoint_path(run_dir, sigma_rel, None if step == found[-1]["step"] else step)
    AtomicCheckpointIO().save_checkpoint(written, path)
    return path
