"""Fixtures of the CPU speed plug-in's tests: the only tests that switch it on and build its kernels."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="package")
def _plug_in_on(tmp_path_factory):
    """conf `kernels` resolves to auto here (tests/conftest.py makes it off elsewhere); route decisions in a folder of
    this session, not the user's cache; the kernels built before first use rather than in the background, so that
    a test's runs all take the same routes."""
    from ddpm_lightning.cpu import autotune

    before = {k: os.environ.get(k) for k in ("DDPM_LIGHTNING_KERNELS", "DDPM_LIGHTNING_CACHE")}
    os.environ["DDPM_LIGHTNING_KERNELS"] = "auto"
    os.environ["DDPM_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("routes"))
    autotune.configure("auto", wait=True)
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh route cache in tmp_path (its path is the fixture's value); the decisions of the rest of the session
    are restored afterwards."""
    from ddpm_lightning.cpu import autotune as routes

    monkeypatch.setenv("DDPM_LIGHTNING_CACHE", str(tmp_path))
    saved = dict(routes._decisions), dict(routes._used), dict(routes._file)
    routes.reset()
    yield routes.cache_path()
    routes.reset()
    routes._decisions.update(saved[0]), routes._used.update(saved[1]), routes._file.update(saved[2])
