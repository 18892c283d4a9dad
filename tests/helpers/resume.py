"""What the resume tests share: the repository root, the subprocesses' environment, the run and its states."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}

# 8 steps, checkpoints every 2, shuffled digits (101 batches an epoch: every kill is mid-epoch), dropout on;
# kernels=off: the straight and the killed run are separate runs, each timing its own routes (a resumed run takes
# its checkpoint's: test_resume_edges.py); the learning rate decays to zero over the 8 steps, so the resumed run must
# continue the decay where it stopped.
RUN = ["trainer.max_steps=8", "trainer.deterministic=true", "model.dropout=0.1", "callbacks.samples.every_n_steps=0", "kernels=off",
       "module.lr_decay=cosine"]

def states(ckpt: Path) -> dict:
    c = torch.load(ckpt, weights_only=False)
    return {"step": c["global_step"], "ema": c["state_dict"], "raw": c["current_model_state"],
            "adam": c["optimizer_states"][0]["state"], "lr": c["lr_schedulers"][0]["last_epoch"]}


# Runs that stop on an epoch's last batch (tests/test_resume_edges.py, tests/cpu/test_resume_routes.py).
EPOCH = ["data.batch_size=128", "trainer.deterministic=true", "callbacks.samples.every_n_steps=0", "logger=none",
         "trainer.val_check_interval=100", "callbacks.checkpoint.every_n_train_steps=2"]


def epoch_states(ckpt: Path) -> dict:
    c = torch.load(ckpt, weights_only=True)
    return {"step": c["global_step"], "epoch": c["epoch"], "ema": c["state_dict"], "raw": c["current_model_state"],
            "adam": c["optimizer_states"][0]["state"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for part in ("raw", "ema"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), f"{part} {k} differs after resume"
    for i, s in a["adam"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(b["adam"][i][k], s[k]), f"Adam {k} of parameter {i} differs"
