"""Nothing lost: exact resume from a checkpoint written on the last batch of an epoch, a checkpoint on Ctrl-C /
SIGTERM that resumes exactly, and one training per run directory (a lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers.config import TINY, compose_cfg
from helpers.resume import EPOCH
from helpers.resume import assert_same as _assert_same
from helpers.resume import epoch_states as _states
from ddpm_lightning.runs import InterruptCheckpoint, RunLock
from ddpm_lightning.tasks import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
# 1617 training digits in batches of 128: 12 batches an epoch (drop_last); a checkpoint every 2 steps.
@pytest.mark.slow
def test_resume_from_the_last_batch_of_an_epoch_is_exact(tmp_path):
    torch.set_num_threads(1)
    train(compose_cfg([*EPOCH, "trainer.max_steps=14"], tmp_path / "straight"))
    train(compose_cfg([*EPOCH, "trainer.max_steps=12"], tmp_path / "resumed"))  # stops on epoch 0's last batch
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    train(compose_cfg([*EPOCH, "trainer.max_steps=14"], tmp_path / "resumed"))  # finds last.ckpt itself
    straight, resumed = (_states(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "resumed"))
    assert straight["epoch"] == 1  # steps 13 and 14 are epoch 1's first two batches
    _assert_same(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, signum):
    torch.set_num_threads(1)
    # kernels=off: the straight and the interrupted run are separate runs, each timing its own routes
    run = ["trainer.deterministic=true", "callbacks.samples.every_n_steps=0", "logger=none",
           "callbacks.checkpoint.every_n_train_steps=100", "kernels=off"]
    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *run, "trainer.max_steps=-1", f"paths.output_dir={out}",
           f"hydra.run.dir={out}", "+callbacks.signal._target_=helpers.signals.SignalAt", "+callbacks.signal.step=3",
           f"+callbacks.signal.signum={signum}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert f"Interrupted ({'Ctrl-C' if signum == 'SIGINT' else signum}): saved" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == (1 if signum == "SIGINT" else 128 + 15)  # KeyboardInterrupt (Lightning's), 128 + SIGTERM
    assert "`weights_only` was not set" not in proc.stderr + proc.stdout
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] in (3, 4)  # the step under way when the signal came, completed
    assert not (out / "run.lock").exists()

    train(compose_cfg([*run, "trainer.max_steps=6"], out))
    train(compose_cfg([*run, "trainer.max_steps=6"], tmp_path / "straight"))
    _assert_same(*(_states(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "straight", out)))


def test_sigterm_exit_status_is_nonzero_unless_the_job_was_requeued(tmp_path):
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), training=False)
    callback = InterruptCheckpoint()
    callback.setup(trainer, None, "validate")
    stopped = SIGTERMException()
    callback.on_exception(trainer, None, stopped)
    assert stopped.code == 128 + 15
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")  # what Lightning's SLURM handler writes before requeueing
    requeued = SIGTERMException()
    callback.on_exception(trainer, None, requeued)
    assert requeued.code is None  # Lightning's exit 0: the job goes on in its requeued copy


def _lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / RunLock.NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))
    return run / RunLock.NAME


def test_a_second_training_in_a_run_directory_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _lock(tmp_path / "run", pid=other.pid)
        with pytest.raises(RuntimeError, match=rf"in use by another training \(pid {other.pid} on {socket.gethostname()}"):
            train(compose_cfg(["trainer.max_steps=1"], tmp_path / "run"))
        assert lock.is_file() and not (tmp_path / "run" / "config.yaml").exists()
        with pytest.raises(RuntimeError, match=f"delete {lock}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        other.kill()
        other.wait()
    # that process is gone now: its lock is stale and taken over, and released at the end
    with RunLock(tmp_path / "run") as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
    assert not lock.exists()


def test_lock_other_host_requeued_job_and_other_ranks(tmp_path, monkeypatch):
    lock = _lock(tmp_path / "run", pid=1, host="another-node", slurm_job_id="4242")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match="pid 1 on another-node"):  # cannot tell: refused
        RunLock(tmp_path / "run").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued (maybe on another node): takes over
    with RunLock(tmp_path / "run"):
        assert json.loads(lock.read_text())["slurm_job_id"] == "4242"
    _lock(tmp_path / "run", pid=1, host="another-node", slurm_job_id="1")
    for key in ("LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"):  # DDP ranks > 0 run inside rank 0's lock
        monkeypatch.setenv(key, "1")
        assert not RunLock(tmp_path / "run").acquire().held
        monkeypatch.delenv(key)
    assert json.loads(lock.read_text())["slurm_job_id"] == "1"


@pytest.mark.slow
def test_final_steps_after_the_last_periodic_checkpoint_are_saved(tmp_path):
    torch.set_num_threads(1)
    run = ["trainer.deterministic=true", "callbacks.samples.every_n_steps=0", "logger=none"]  # a checkpoint every 2
    train(compose_cfg([*run, "trainer.max_steps=5"], tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    train(compose_cfg([*run, "trainer.max_steps=7"], tmp_path / "resumed"))
    train(compose_cfg([*run, "trainer.max_steps=7"], tmp_path / "straight"))
    _assert_same(*(_states(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "straight", tmp_path / "resumed")))
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["last.ckpt"]



def _record(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "config.yaml")}


def test_a_refused_training_leaves_the_runs_record_as_it_was(tmp_path):
    """.hydra/ and train.log are written once a training is accepted: a second training of another model in the run
    directory, or one against the lock of a live training, is refused and leaves them byte for byte as they were."""
    run = tmp_path / "run"
    train_py = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_steps=2", "callbacks.samples.every_n_steps=0",
                "logger=none", f"paths.output_dir={run}", f"hydra.run.dir={run}"]
    first = subprocess.run(train_py, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _record(run)
    assert b"Run directory" in before["train.log"] and b"trainer.max_steps=2" in before[".hydra/overrides.yaml"]
    refused = subprocess.run([*train_py, "model.ch=64", "trainer.max_steps=4"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "model.ch=64" not in before[".hydra/overrides.yaml"].decode()
    assert _record(run) == before
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        _lock(run, pid=other.pid)
        locked = subprocess.run([*train_py, "trainer.max_steps=4"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        other.kill()
    assert locked.returncode != 0 and "run.lock" in locked.stderr + locked.stdout
    assert _record(run) == before
