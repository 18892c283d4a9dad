"""DDP on CPU: 2 gloo processes with batch n each train like one process with batch 2 n (same global batch, same
training noise), keep identical EMA weights on both ranks, and make the sharded sample grid without hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import TINY, compose_cfg
from ddpm_lightning.tasks import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data._target_=helpers.scaleout.FixedOrderDigits", "+data.world=2", "trainer.limit_val_batches=0", "model.dropout=0.0"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [[], ["schedule=edm", "module.parameterization=edm"]], ids=["ddpm", "edm"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, objective):
    ddp = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *DATA, *objective, "+data.single_process=false", "trainer=ddp",
           "trainer.devices=2", "trainer.accelerator=cpu", "+trainer.use_distributed_sampler=false", "trainer.strategy.process_group_backend=gloo",
           f"paths.output_dir={ddp}", f"hydra.run.dir={ddp}",
           "+callbacks.dump._target_=helpers.scaleout.DumpRankState", f"+callbacks.dump.dirpath={ddp}/ranks"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = tmp_path / "single"
    torch.set_num_threads(1)
    train(compose_cfg([*DATA, *objective, "+data.single_process=true", "+callbacks.dump._target_=helpers.scaleout.DumpRankState",
                       f"+callbacks.dump.dirpath={single}/ranks"], single))

    r0, r1 = (torch.load(ddp / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    one = torch.load(single / "ranks" / "rank0.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2 and one["world_size"] == 1
    # The EMA (and the raw weights) are bitwise identical on both ranks.
    for part in ("ema", "raw"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part} {k} differs between ranks"
    # The global batch's loss is the mean of the ranks' losses, step by step. float32: only the order of the
    # reductions differs (two halves averaged vs one mean); measured 6e-8 relative.
    ddp_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(ddp_losses) == len(one["losses"]) == 4
    assert ddp_losses == pytest.approx(one["losses"], rel=1e-6, abs=0)
    assert r0["losses"] != pytest.approx(r1["losses"], rel=1e-3)  # the ranks did see different data and noise
    # Weights after 4 Adam steps: the all-reduced gradient differs from the single-process one by rounding only,
    # which Adam's division by sqrt(v) magnifies for near-zero gradients; measured max |diff| 5e-7, against
    # steps of about lr = 2e-4 per weight. Tolerance atol 2e-6 (a wrong batch or noise slice gives ~1e-3).
    for part in ("raw", "ema"):
        for k, v in one[part].items():
            torch.testing.assert_close(r0[part][k], v, rtol=0, atol=2e-6, msg=lambda m: f"{part} {k}: {m}")
    # The sharded sample grids (seeds split over the ranks, all_gathered) were written once per grid step.
    assert sorted(p.name for p in (ddp / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]


def _open_gloo_group() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_a_process_group_opened_by_a_run_is_destroyed_when_it_ends():
    """Lightning leaves a gloo group to interpreter shutdown, which can abort a finished process (SIGABRT)."""
    from ddpm_lightning.tasks import process_group_closed_at_end

    with pytest.raises(RuntimeError, match="boom"), process_group_closed_at_end():
        _open_gloo_group()
        assert torch.distributed.is_initialized()
        raise RuntimeError("boom")  # also on failure
    assert not torch.distributed.is_initialized()

    _open_gloo_group()  # a group the caller opened is the caller's to close
    try:
        with process_group_closed_at_end():
            pass
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
