"""A resumed run takes the CPU routes its checkpoint records (`cpu_routes`, written by the plug-in's RoutesCallback),
whatever the route cache says."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.config import compose_cfg
from ddpm_lightning.cpu import autotune as routes
from ddpm_lightning.tasks import train
from helpers.resume import EPOCH
from helpers.resume import assert_same as _assert_same
from helpers.resume import epoch_states as _states


@pytest.mark.slow
def test_a_resumed_run_takes_its_checkpoints_routes_whatever_the_route_cache_says(tmp_path, monkeypatch):
    """Routes differ in rounding and are timed per machine: a run resumed where the route cache says otherwise
    (another process's measurements, another node) still takes the routes its checkpoint records."""
    torch.set_num_threads(1)
    run = [*EPOCH, "kernels=auto"]
    monkeypatch.setenv("DDPM_LIGHTNING_CACHE", str(tmp_path / "cache_a"))
    train(compose_cfg([*run, "trainer.max_steps=6"], tmp_path / "straight"))
    train(compose_cfg([*run, "trainer.max_steps=4"], tmp_path / "resumed"))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    taken = torch.load(last, weights_only=True)["cpu_routes"]["routes"]
    cache = json.loads(routes.cache_path().read_text())
    flipped = 0
    for key, decision in cache["routes"].items():  # every measured decision the run took, changed to another candidate
        others = [r for r in decision["ms"] if r != decision["route"]]
        if key in taken and others:
            decision["route"], flipped = others[0], flipped + 1
    assert flipped
    monkeypatch.setenv("DDPM_LIGHTNING_CACHE", str(tmp_path / "cache_b"))
    routes.cache_path().parent.mkdir()
    routes.cache_path().write_text(json.dumps(cache))
    step4 = torch.load(last, weights_only=True)

    train(compose_cfg([*run, "trainer.max_steps=6"], tmp_path / "resumed"))
    straight = _states(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    _assert_same(straight, _states(last))
    # The control: the same resume without the checkpoint's routes takes the cache's, and ends elsewhere.
    del step4["cpu_routes"]
    torch.save(step4, last)
    train(compose_cfg([*run, "trainer.max_steps=6"], tmp_path / "resumed"))
    with pytest.raises(AssertionError, match="differs after resume"):
        _assert_same(straight, _states(last))
