"""Fixtures of the CPU speed plug-in's tests: the only tests that build the kernels."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _route_cache(tmp_path_factory):
    """CPU route decisions (ddpm_lightning.cpu.autotune) in a folder of this session, not the user's cache, and the
    kernels built before first use rather than in the background, so that a test's runs all take the same routes."""
    from ddpm_lightning.cpu import autotune

    os.environ["DDPM_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("routes"))
    autotune.configure(wait=True)
    yield
