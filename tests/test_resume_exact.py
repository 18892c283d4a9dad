"""Reliability on one machine: a SIGKILLed run resumed from its checkpoint ends bitwise where an uninterrupted run
ends; a kill while a checkpoint is being written leaves the previous checkpoint loadable."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.config import TINY, compose_cfg
from helpers.resume import ENV, ROOT, RUN
from helpers.resume import states as _states
from ddpm_lightning.checkpointing import AtomicCheckpointIO
from ddpm_lightning.runs import resume_checkpoint
from ddpm_lightning.tasks import train



@pytest.mark.slow
def test_sigkill_then_automatic_resume_equals_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    train(compose_cfg(RUN, tmp_path / "straight"))
    straight = _states(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *RUN, f"paths.output_dir={killed}", f"hydra.run.dir={killed}",
           "+callbacks.kill._target_=helpers.scaleout.KillAt", "+callbacks.kill.step=5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # died by SIGKILL after step 5 (last checkpoint: step 4)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    # Same run directory, no ckpt_path: train() finds last.ckpt itself and continues to step 8.
    assert resume_checkpoint(killed, [killed / "checkpoints"]) == killed / "checkpoints" / "last.ckpt"
    train(compose_cfg(RUN, killed))
    resumed = _states(killed / "checkpoints" / "last.ckpt")

    assert resumed["step"] == straight["step"] == 8 and resumed["lr"] == straight["lr"] == 8
    # the killed start's metrics survive the resume next to the resumed start's
    logged = [[int(float(r["step"])) for r in csv.DictReader(open(killed / "csv" / v / "metrics.csv"))] for v in ("version_0", "version_1")]
    assert min(logged[0]) == 0 and max(logged[0]) >= 3 and min(logged[1]) >= 4 and max(logged[1]) >= 7
    for part in ("raw", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(resumed[part][k], v), f"{part} {k} differs after resume"
    for i, s in straight["adam"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed["adam"][i][k], s[k]), f"Adam {k} of parameter {i} differs"


def test_without_step_seeds_the_resume_differs(tmp_path):
    """The control: with seed=null the training noise after a resume is not the uninterrupted run's."""
    torch.set_num_threads(1)
    run = ["seed=null", "trainer.max_steps=3", "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=1"]
    torch.manual_seed(0)
    train(compose_cfg(run, tmp_path / "a"))
    torch.manual_seed(0)
    train(compose_cfg([*run, "trainer.max_steps=2"], tmp_path / "b"))
    train(compose_cfg(run, tmp_path / "b"))  # resumes at step 2 from the global RNG's current state
    a, b = (_states(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("a", "b"))
    assert a["step"] == b["step"] == 3
    assert not all(torch.equal(a["raw"][k], b["raw"][k]) for k in a["raw"])


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from ddpm_lightning.checkpointing import AtomicCheckpointIO
    path = sys.argv[1]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save
    def dying_save(obj, f, *a, **k):  # write half the bytes of the new checkpoint, then die
        import io as _io
        buf = _io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    """
)


def test_kill_during_checkpoint_write_keeps_last_ckpt_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], env=ENV, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size  # it did die mid-write of the new file
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=False)  # ... and that file is unreadable
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    # The next save replaces the target and leaves no temporary file of its own.
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 3
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1  # only the dead process's leftover


def test_the_trainer_writes_checkpoints_through_atomic_io(tmp_path):
    from hydra.utils import instantiate

    from ddpm_lightning.compose import resolve_precision

    for overrides in ([], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"]):
        cfg = compose_cfg(overrides, tmp_path)
        resolve_precision(cfg.trainer)
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO), overrides


def test_resume_checkpoint_picks_the_newest_of_hpc_and_last(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resume_checkpoint(tmp_path, [ckpts]) is None  # a fresh run directory
    ckpts.mkdir()
    for i, path in enumerate([ckpts / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt", ckpts / "last.ckpt"]):
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 + i * 10**9,) * 2)
        assert resume_checkpoint(tmp_path, [ckpts]) == path
