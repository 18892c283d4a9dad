"""Random flips drawn per step: a run with flips that is SIGKILLed and resumed ends bitwise where an uninterrupted
run ends, as without flips (tests/test_resume_exact.py)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers.config import TINY, compose_cfg
from ddpm_lightning.tasks import train
from helpers.quickstart import FlippedDigits
from helpers.resume import ENV, ROOT, RUN
from helpers.resume import states as _states

FLIPS = ["data._target_=helpers.quickstart.FlippedDigits"]  # RUN pins the CPU routes (kernels=off)


def _flipped(dm, x, seed=0, epoch=0, batch_idx=0, world=1, rank=0, training=True):
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx - 1))
    dm.trainer = SimpleNamespace(training=training, lightning_module=SimpleNamespace(hparams={"seed": seed}),
                                 fit_loop=loop, current_epoch=epoch, world_size=world, global_rank=rank)
    return dm.on_before_batch_transfer([x, torch.zeros(len(x))], 0)[0]


def test_the_flip_of_a_batch_is_a_function_of_seed_epoch_and_batch_index():
    dm = FlippedDigits(image_size=8, batch_size=64)
    x = torch.randn(64, 1, 8, 8)
    a = _flipped(dm, x, batch_idx=3)
    flipped = (a != x).flatten(1).any(1)
    assert torch.equal(a[flipped], x[flipped].flip(-1)) and torch.equal(a[~flipped], x[~flipped])
    assert 16 < int(flipped.sum()) < 48  # about half, each image whole
    assert torch.equal(_flipped(dm, x, batch_idx=3), a)  # the same step flips the same way
    for other in (dict(batch_idx=4), dict(epoch=1, batch_idx=3), dict(seed=1, batch_idx=3)):
        assert not torch.equal(_flipped(dm, x, **other), a), other
    # two ranks with half batches each take the slices of the global batch's flips
    halves = [_flipped(dm, x[r * 32 : (r + 1) * 32], batch_idx=3, world=2, rank=r) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)
    assert torch.equal(_flipped(dm, x, training=False), x)  # validation batches stay unflipped


@pytest.mark.slow
def test_sigkill_then_resume_with_random_flips_equals_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    train(compose_cfg([*RUN, *FLIPS], tmp_path / "straight"))
    straight = _states(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *RUN, *FLIPS, f"paths.output_dir={killed}", f"hydra.run.dir={killed}",
           "+callbacks.kill._target_=helpers.scaleout.KillAt", "+callbacks.kill.step=5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    train(compose_cfg([*RUN, *FLIPS], killed))  # continues from its last.ckpt (step 4)
    resumed = _states(killed / "checkpoints" / "last.ckpt")

    assert resumed["step"] == straight["step"] == 8
    for part in ("raw", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(resumed[part][k], v), f"{part} {k} differs after resume"
