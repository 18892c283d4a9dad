"""Against a real one-node SLURM cluster on localhost (slurm/local_cluster.sh; skipped where slurm-wlm and munge
are not installed): sbatch of slurm/train.sbatch, a requeue on SIGUSR1 that resumes by itself, a Hydra multirun
sweep through the submitit launcher."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.config import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for SLURM clients; starts the local cluster unless it already runs (stops it only if it did)."""
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        pytest.skip("slurm-wlm / munge not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    conf_dir = os.environ.get("DDPM_SLURM_DIR", "/tmp/ddpm-slurm")
    env = {**os.environ, "DDPM_SLURM_DIR": conf_dir, "SLURM_CONF": f"{conf_dir}/slurm.conf",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    started = subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), "start"], env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start:\n{started.stdout}\n{started.stderr}")
    yield env
    if "already up" not in started.stdout:
        subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), "stop"], env=env, timeout=60)


def _sbatch(env, out: Path, *args: str) -> int:
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return int(proc.stdout.strip().split(";")[0])


def _job(env, job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(env, job: int, timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job)], env=env, timeout=30)
    pytest.fail(f"job {job} did not finish in {timeout} s: {_job(env, job)}")


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]


def test_sbatch_train_finishes_and_writes_checkpoint(slurm, tmp_path):
    job = _sbatch(slurm, tmp_path / "job.out", "slurm/train.sbatch", *TINY, f"paths.log_dir={tmp_path}")
    info = _wait(slurm, job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run = tmp_path / "runs" / f"slurm-{job}"  # keyed on the job id, so a requeued job finds it
    assert _step(run / "checkpoints" / "last.ckpt") == 4
    assert "1 node(s) x 1 task(s)" in log


def test_sigusr1_requeues_and_the_job_resumes_by_itself(slurm, tmp_path):
    run_args = [*TINY, f"paths.log_dir={tmp_path}", "trainer.max_steps=40", "trainer.val_check_interval=20",
                "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=5",
                "+callbacks.slow._target_=helpers.scaleout.SlowSteps", "+callbacks.slow.seconds=0.1"]
    job = _sbatch(slurm, tmp_path / "job.out", "slurm/train.sbatch", *run_args)
    run = tmp_path / "runs" / f"slurm-{job}"
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "last.ckpt").is_file():  # training is under way
        assert time.monotonic() < deadline and _job(slurm, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            (tmp_path / "job.out").read_text()[-3000:] if (tmp_path / "job.out").exists() else _job(slurm, job))
        time.sleep(0.2)
    # What SLURM sends before the time limit (--signal=SIGUSR1@90), sent now, to the job's tasks.
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm, check=True, timeout=30)
    # SLURM holds a requeued job for about two minutes before it is eligible again; let it start now.
    deadline = time.monotonic() + 120
    while _job(slurm, job).get("Restarts") != "1" or _job(slurm, job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline and _job(slurm, job).get("JobState") != "COMPLETED", _job(slurm, job)
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True, timeout=30)
    info = _wait(slurm, job, timeout=240)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) == 1, log[-3000:]
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and 5 <= _step(hpc[0]) < 40  # written on the signal, mid-run
    # the newest of hpc_ckpt_1.ckpt (written on SIGUSR1) and last.ckpt (written when the requeue's SIGTERM stopped it)
    assert f"Resuming from {hpc[0]}" in log or f"Resuming from {run / 'checkpoints' / 'last.ckpt'}" in log, log[-3000:]
    assert _step(run / "checkpoints" / "last.ckpt") == 40


def test_hydra_multirun_sweep_on_slurm_runs_every_job(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "schedule=linear,cosine", *TINY,
           f"hydra.sweep.dir={sweep}", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=10"]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, schedule in ((0, "linear"), (1, "cosine")):
        run = sweep / str(num)
        assert _step(run / "checkpoints" / "last.ckpt") == 4
        assert "_target_: ddpm_lightning.diffusion.schedules." in (run / "config.yaml").read_text()
        assert (run / ".hydra" / "overrides.yaml").read_text().count(f"schedule={schedule}") == 1
    assert len(list((sweep / ".submitit").iterdir())) >= 2  # one submitit folder per SLURM job


def test_sbatch_evaluate_samples_a_checkpoint(slurm, tmp_path):
    from helpers.config import compose_cfg
    from ddpm_lightning.tasks import train

    train(compose_cfg(["trainer.max_steps=2", "callbacks.samples.every_n_steps=0"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    # metrics=[] samples and writes the set without Inception weights (which an offline test machine lacks)
    job = _sbatch(slurm, tmp_path / "job.out", "--ntasks-per-node=1", "slurm/evaluate.sbatch", f"ckpt_path={ckpt}", "num_samples=6",
                  "batch_size=4", "shard_size=4", "metrics=[]", f"output_dir={out}")
    info = _wait(slurm, job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "Evaluated 6 samples" in log and (out / "grid.png").is_file() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["seeds_00000000-00000004.npz", "seeds_00000004-00000006.npz"]
