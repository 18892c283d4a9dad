"""Post-hoc EMA (Karras et al. 2024, Sec. 3 and App. C): the sigma_rel <-> gamma map and the paper's values, the
least-squares fit of profiles, the power-function EMA against its profile, reconstruction from the snapshots of a
real run against an EMA tracked directly, the checkpoint the command writes, exact resume, evaluate.py sweeps, and
the refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.config import compose_cfg, eval_cfg
from helpers.resume import ENV, ROOT
from ddpm_lightning import posthoc_ema as command
from ddpm_lightning.checkpointing import read_checkpoint
from ddpm_lightning.evaluation import make_plan
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import evaluate, train
from ddpm_lightning.training.posthoc_ema import (
    SIGMA_REL_MAX,
    PostHocEMA,
    gamma_to_sigma_rel,
    profile_dot,
    reconstruct,
    sigma_rel_to_gamma,
    solve_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

POSTHOC = ["callbacks=posthoc_ema", "callbacks.samples=null", "logger=none"]


def rel_l2(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of b."""
    num = sum(((a[k].double() - v.double()) ** 2).sum() for k, v in b.items())
    return float((num / sum((v.double() ** 2).sum() for v in b.values())).sqrt())


# The mathematics -----------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_round_trip_and_match_the_paper():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)  # Karras et al. 2024, Sec. 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.075, 0.1, 0.2, 0.29, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for g in (-0.3, 0.0, 1.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-7)
    # the widest profile: gamma + 1 = (sqrt(5) - 1) / 2, the largest sigma_rel
    assert gamma_to_sigma_rel((5**0.5 - 3) / 2) == pytest.approx(SIGMA_REL_MAX, rel=1e-12)
    assert all(gamma_to_sigma_rel(g) < SIGMA_REL_MAX for g in np.linspace(-0.99, 50, 500))


def test_profile_dot_is_the_integral_of_the_product():
    tau = np.linspace(0, 300, 3_000_001)
    p = lambda t, g: np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)  # noqa: E731
    for t_a, g_a, t_b, g_b in ((300, 6.94, 200, 16.97), (120, 0.5, 300, 2.0), (250, 16.97, 250, 16.97)):
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p(t_a, g_a) * p(t_b, g_b), tau), rel=1e-4)
    # no overflow at the step counts of real runs
    assert np.isfinite(profile_dot(8e5, 16.97, 4e5, 6.94)) and profile_dot(8e5, 16.97, 4e5, 6.94) > 0


def test_solve_weights_gives_a_unit_vector_for_a_tracked_profile():
    times = [100, 100, 200, 200, 300, 300]
    gammas = [16.97, 6.94] * 3
    for i, (t, g) in enumerate(zip(times, gammas)):
        x = solve_weights(times, gammas, t, g)
        assert np.allclose(x, np.eye(len(times))[i], atol=1e-6), (i, x)
    # a profile between the tracked ones: a combination of several snapshots, scaled to sum to 1 like an average
    x = solve_weights(times, gammas, 300, sigma_rel_to_gamma(0.075))
    assert np.count_nonzero(np.abs(x) > 1e-3) >= 4 and x.sum() == pytest.approx(1, abs=1e-12)
    # from snapshots every 10 steps the fit is close: ||sum_i x_i p_i - p||^2 = x'Ax - 2 x'b + <p, p>
    t, g = np.repeat(np.arange(10, 301, 10), 2), np.tile([16.97, 6.94], 30)
    gamma = sigma_rel_to_gamma(0.075)
    x = solve_weights(t, g, 300, gamma)
    A, b = profile_dot(t[:, None], g[:, None], t[None], g[None]), profile_dot(t, g, 300, gamma)
    residual = x @ A @ x - 2 * x @ b + profile_dot(300, gamma, 300, gamma)
    assert 0 <= residual < 1e-5 * profile_dot(300, gamma, 300, gamma)


def test_the_power_function_ema_averages_with_its_profile():
    """Updated with theta_tau = e_tau (the unit vectors), the EMA after T steps is the weight given to each step:
    (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1), the integral of the profile p_T over [tau - 1, tau]."""
    T, ema = 50, PostHocEMA(sigma_rels=[0.05, 0.2], every_n_steps=0)
    for t in range(1, T + 1):
        ema.update({"w": torch.eye(T, dtype=torch.float64)[t - 1]}, t)
    tau = np.arange(1, T + 1)
    for gamma, state in zip(ema.gammas, ema.emas):
        expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
        assert np.allclose(state["w"].numpy(), expected, rtol=1e-10, atol=1e-15)
        assert state["w"].sum().item() == pytest.approx(1, abs=1e-12)
    assert ema.step == T


# Reconstruction from a real run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """200 steps of the two-moons MLP tracking sigma_rel 0.05 and 0.10 (snapshots every 10 steps) and, directly,
    0.075 (a second callback, its one snapshot at the end)."""
    root = tmp_path_factory.mktemp("posthoc_toy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(compose_cfg([
        "experiment=toy2d", *POSTHOC, "trainer.max_steps=200", "trainer.val_check_interval=200", "trainer.limit_val_batches=1",
        "data.n_train=2000", "callbacks.checkpoint.every_n_train_steps=200", "callbacks.posthoc_ema.every_n_steps=10",
        "+callbacks.direct._target_=ddpm_lightning.training.posthoc_ema.PostHocEMA", "+callbacks.direct.sigma_rels=[0.075]",
        "+callbacks.direct.every_n_steps=0", f"+callbacks.direct.dirpath={root / 'direct'}",
    ], root / "run", tiny=False))
    torch.set_num_threads(threads)
    return root / "run", torch.load(root / "direct" / "snapshot_0000200.pt", weights_only=True)


def test_reconstruction_equals_the_ema_tracked_directly(toy_run):
    """sigma_rel 0.075 reconstructed from the 0.05 / 0.10 snapshots agrees with the EMA tracked with 0.075 to a
    relative L2 error (over all parameters) below TOL = 1e-3: measured 6.1e-6. Reconstructing a neighbouring width
    instead (0.07: 2.3e-3, 0.05: 1.2e-2) or taking the tracked 0.05 or 0.10 EMA (1.1e-2) fails that tolerance."""
    TOL = 1e-3
    run, direct = toy_run
    assert direct["step"] == 200 and direct["sigma_rels"] == [0.075]
    target = direct["states"][0]
    snapshots = sorted(p.name for p in (run / "posthoc_ema").glob("*.pt"))
    assert snapshots == [f"snapshot_{s:07d}.pt" for s in range(10, 201, 10)]
    got = reconstruct(run, 0.075)
    assert got.keys() == target.keys() and all(got[k].dtype == v.dtype for k, v in target.items())
    assert rel_l2(got, target) < TOL
    for wrong in (0.07, 0.05, 0.10):
        assert rel_l2(reconstruct(run, wrong), target) > TOL, wrong
    tracked = torch.load(run / "posthoc_ema" / "snapshot_0000200.pt", weights_only=True)
    assert tracked["sigma_rels"] == [0.05, 0.10] and all(rel_l2(s, target) > TOL for s in tracked["states"])
    # at a tracked width the reconstruction is that snapshot
    assert rel_l2(reconstruct(run, 0.10), tracked["states"][1]) < 1e-6


def test_reconstruction_at_an_earlier_step_uses_the_snapshots_up_to_it(toy_run):
    run, _ = toy_run
    at_100 = torch.load(run / "posthoc_ema" / "snapshot_0000100.pt", weights_only=True)
    assert rel_l2(reconstruct(run / "posthoc_ema", 0.05, step=100), at_100["states"][0]) < 1e-6
    with pytest.raises(ValueError, match="step=201"):
        reconstruct(run, 0.05, step=201)


# The checkpoint, evaluate.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 20-step tiny digits U-Net with post-hoc EMA snapshots every 5 steps."""
    root = tmp_path_factory.mktemp("posthoc_digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(compose_cfg([*POSTHOC, "trainer.max_steps=20", "trainer.val_check_interval=20", "callbacks.checkpoint.every_n_train_steps=20",
                       "callbacks.posthoc_ema.every_n_steps=5"], root / "run"))
    torch.set_num_threads(threads)
    return root / "run"


def test_the_command_writes_a_checkpoint_that_loads_and_samples(digits_run, tmp_path, capsys):
    assert command.main([str(digits_run), "sigma_rel=0.08"]) == 0
    path = digits_run / "checkpoints" / "posthoc_ema_sigma0.080.ckpt"
    assert str(path) in capsys.readouterr().out
    ckpt = read_checkpoint(path)
    assert ckpt["global_step"] == 20 and ckpt["posthoc_ema"]["sigma_rel"] == 0.08
    assert ckpt["posthoc_ema"]["snapshot_steps"] == [5, 10, 15, 20]
    expected = reconstruct(digits_run, 0.08)
    net = load_model(path).net.state_dict()
    assert all(torch.equal(net[k], v) for k, v in expected.items())
    template = read_checkpoint(digits_run / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(template["state_dict"][f"net.{k}"], v) for k, v in expected.items())  # not the EMA callback's
    raw = load_model(path, use_ema=False).state_dict()
    assert all(torch.equal(raw[k], v) for k, v in template["current_model_state"].items())
    result = evaluate(eval_cfg(path, tmp_path / "e"))  # as python evaluate.py ckpt_path=<it> does
    assert result["num_samples"] == 6 and np.load(tmp_path / "e" / "samples.npz")["arr_0"].shape == (6, 8, 8, 1)
    assert command.main([str(digits_run), "sigma_rel=0.05", "step=10", f"out={tmp_path / 'x.ckpt'}"]) == 0
    assert read_checkpoint(tmp_path / "x.ckpt")["posthoc_ema"]["snapshot_steps"] == [5, 10]


def test_an_evaluate_sweep_over_sigma_rel_evaluates_each_reconstruction(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "-m", f"ckpt_path={ckpt}", "posthoc_ema.sigma_rel=0.05,0.12", "sampler=ddim",
           "sampler.steps=2", "num_samples=2", "batch_size=2", "shard_size=2", "metrics=[]", "grid_size=0",
           "trainer.accelerator=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = sorted((digits_run / "eval").glob("step20-posthoc*"))
    assert [o.name.split("-")[1] for o in outs] == ["posthoc0.050", "posthoc0.120"]
    for out, sigma_rel in zip(outs, (0.05, 0.12)):
        result = json.loads((out / "metrics.json").read_text())
        assert result["checkpoint"]["posthoc_ema_sigma_rel"] == sigma_rel and result["num_samples"] == 2
        assert result["checkpoint"]["path"].endswith(f"posthoc_ema_sigma{sigma_rel:.3f}.ckpt")
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()


# Exact resume -------------------------------------------------------------------------------------------


def _posthoc_state(ckpt_path) -> dict:
    callbacks = torch.load(ckpt_path, weights_only=True)["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith("PostHocEMA"))


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["gammas"] == b["gammas"]
    for sa, sb in zip(a["states"], b["states"], strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resumed_run_continues_the_averages_exactly(tmp_path):
    """Stopped at step 3 (its last.ckpt written by the run's interrupt callback, which runs before this one) and
    resumed to 8: the averages in the checkpoint and the snapshots equal those of an uninterrupted run, bitwise. A
    resume from a checkpoint without the averages' state differs."""
    run = ["experiment=toy2d", *POSTHOC, "trainer.deterministic=true", "trainer.val_check_interval=100", "data.n_train=2000",
           "callbacks.checkpoint.every_n_train_steps=2", "callbacks.posthoc_ema.every_n_steps=2"]
    train(compose_cfg([*run, "trainer.max_steps=8"], tmp_path / "straight", tiny=False))
    train(compose_cfg([*run, "trainer.max_steps=3"], tmp_path / "resumed", tiny=False))
    assert _posthoc_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["step"] == 3
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if not k.startswith("PostHocEMA")}
    torch.save(ckpt, tmp_path / "lost.ckpt")
    train(compose_cfg([*run, "trainer.max_steps=8"], tmp_path / "resumed", tiny=False))
    train(compose_cfg([*run, "trainer.max_steps=8", f"ckpt_path={tmp_path / 'lost.ckpt'}"], tmp_path / "lost", tiny=False))
    straight = _posthoc_state(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert straight["step"] == 8
    _assert_same(straight, _posthoc_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    for step in (6, 8):
        name = f"posthoc_ema/snapshot_{step:07d}.pt"
        _assert_same(*(torch.load(tmp_path / r / name, weights_only=True) for r in ("straight", "resumed")))
    lost = _posthoc_state(tmp_path / "lost" / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(lost["states"][0][k], v) for k, v in straight["states"][0].items())


# Bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0, -0.1, 0.31, 1.0, True])
def test_a_width_out_of_range_is_refused(sigma_rel, digits_run, capsys):
    with pytest.raises(ValueError, match=r"lies in \(0, 0\.300"):
        sigma_rel_to_gamma(sigma_rel)
    with pytest.raises(ValueError, match="callbacks.posthoc_ema.sigma_rels"):
        PostHocEMA(sigma_rels=[0.05, sigma_rel])
    with pytest.raises(ValueError, match="posthoc_ema.sigma_rel"):
        make_plan(eval_cfg(digits_run / "checkpoints" / "last.ckpt", "/nonexistent", f"posthoc_ema.sigma_rel={sigma_rel}"))
    if not isinstance(sigma_rel, bool):
        assert command.main([str(digits_run), f"sigma_rel={sigma_rel}"]) == 2
        assert "lies in (0, 0.300" in capsys.readouterr().err


def test_a_run_without_snapshots_is_refused(tiny_run, tmp_path, capsys):
    run, ckpt = tiny_run
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots.*callbacks=posthoc_ema"):
        reconstruct(run, 0.08)
    assert command.main([str(run), "sigma_rel=0.08"]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="posthoc_ema.sigma_rel=0.08 .*no post-hoc EMA snapshots"):
        make_plan(eval_cfg(ckpt, tmp_path / "e", "posthoc_ema.sigma_rel=0.08"))
    assert not list((run / "checkpoints").glob("posthoc*"))


def test_other_bad_input_is_refused(digits_run, tmp_path, capsys):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="use_ema=true"):
        make_plan(eval_cfg(ckpt, tmp_path / "e", "posthoc_ema.sigma_rel=0.08", "use_ema=false"))
    for argv in ([str(digits_run)], ["sigma_rel=0.08"], [str(digits_run), "sigma_rel=0.08", "steps=3"], [str(digits_run), "sigma_rel=x"]):
        assert command.main(argv) == 2
        assert "usage: python -m ddpm_lightning.posthoc_ema" in capsys.readouterr().err
    with pytest.raises(ValueError, match="every_n_steps"):
        PostHocEMA(every_n_steps=-1)
    with pytest.raises(ValueError, match="at least one"):
        PostHocEMA(sigma_rels=[])
    bad = tmp_path / "snapshots"
    bad.mkdir()
    (bad / "snapshot_0000001.pt").write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="not a readable PyTorch post-hoc EMA snapshot"):
        reconstruct(bad, 0.08)
