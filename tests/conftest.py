"""Shared fixtures: a tiny CPU configuration composed from the real config tree."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from helpers.config import compose_cfg


@pytest.fixture(autouse=True, scope="session")
def _plain_networks():
    """conf `kernels` resolves to off ($DDPM_LIGHTNING_KERNELS): runs train and evaluate the plain network. Only the
    plug-in's own tests (tests/cpu) switch the CPU speed plug-in on, and only they build its kernels."""
    before = os.environ.get("DDPM_LIGHTNING_KERNELS")
    os.environ["DDPM_LIGHTNING_KERNELS"] = "off"
    yield
    if before is None:
        os.environ.pop("DDPM_LIGHTNING_KERNELS")
    else:
        os.environ["DDPM_LIGHTNING_KERNELS"] = before


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-step tiny training run shared by the tests that only read it (or copy it first): its run directory and
    checkpoints/last.ckpt."""
    from ddpm_lightning.tasks import train

    root = tmp_path_factory.mktemp("tiny_run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(compose_cfg(["trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "logger=none"], root / "run"))
    torch.set_num_threads(n)
    return root / "run", root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (after the two set below), restored afterwards: tiny tensors gain nothing
    from a second thread, and on a shared, oversubscribed CPU two spinning threads made a tiny U-Net step ~100x
    slower (10.7 s against 0.12 s). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_and_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    GlobalHydra.instance().clear()
