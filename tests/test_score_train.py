"""End to end: the score-based schedules and samplers train briefly on digits and write sample grids."""

import numpy as np
import pytest
from PIL import Image

from helpers.config import TINY, compose_cfg
from ddpm_lightning.tasks import train

TINY_NO_SAMPLER = [o for o in TINY if not o.startswith("sampler")]  # the tiny run, without its DDIM sampler

RUNS = {
    "ncsn_ald": ["schedule=ncsn", "sampler=ald", "sampler.n_steps_each=3"],
    "ve_pc": ["schedule=ve_sde", "schedule.sigma_max=20", "sampler=pc", "sampler.steps=10"],
    "vp_ode": ["schedule=vp_sde", "sampler=ode", "sampler.method=heun", "sampler.steps=6"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_score_based_run_trains_and_writes_a_grid(name, tmp_path):
    overrides = TINY_NO_SAMPLER + RUNS[name] + ["logger=none", "trainer.max_steps=2", "callbacks.samples.every_n_steps=0"]
    metrics = train(compose_cfg(overrides, tmp_path, tiny=False))
    assert np.isfinite(metrics["train/loss"])
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000002.png"))
    assert grid.shape[:2] == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    cells = grid[2:10, 2:10].astype(float), grid[2:10, 12:20].astype(float)
    assert cells[0].std() > 0 and not np.array_equal(*cells)  # images, not a constant or repeated tile


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["schedule=vp_sde", "sampler=ddpm"], "sampler=ddpm"),
        (["schedule=ncsn", "sampler=ode"], "sampler=ode"),
        (["schedule=ncsn", "sampler=pc", "sampler.predictor=euler_maruyama"], "euler_maruyama"),
        (["schedule=ncsn", "schedule.L=1"], "schedule.L"),
        (["schedule=ve_sde", "schedule.sigma_max=0.001"], "schedule.sigma_max"),
        (["schedule=vp_sde", "schedule.beta_min=-1"], "schedule.beta_min"),
    ],
)
def test_invalid_schedule_sampler_pair_fails_before_training(overrides, key, tmp_path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(compose_cfg(TINY_NO_SAMPLER + overrides, tmp_path, tiny=False))
    assert not (tmp_path / "checkpoints").exists()
