"""Toy data (points in 1-D and 2-D), the MLP denoiser and experiment=toy2d / toy1d end to end."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import compose_cfg
from ddpm_lightning.data import ToyDataModule
from ddpm_lightning.nets import MLP
from ddpm_lightning.compose import build
from ddpm_lightning.tasks import train

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "data.n_train=512",
    "data.n_val=64",
    "data.batch_size=64",
    "callbacks.samples.every_n_steps=2",
    "callbacks.samples.num_samples=16",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.progress.refresh_rate=0",
    "model.hidden=32",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=toy2d", "sampler=ddim", "sampler.steps=5"],
        ["experiment=toy2d", "schedule=vp_sde", "sampler=ode", "sampler.method=euler", "sampler.steps=5"],
        ["experiment=toy1d", "schedule=cosine", "sampler=ddim", "sampler.steps=5"],
    ],
    ids=["toy2d-ddim", "toy2d-vp_sde-ode", "toy1d-cosine-ddim"],
)
def test_toy_experiment_trains_and_samples(overrides, tmp_path):
    cfg = compose_cfg([*overrides, *FAST], tmp_path, tiny=False)
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    plots = sorted((tmp_path / "samples").glob("step_*.png"))
    assert [p.name for p in plots] == ["step_0000002.png", "step_0000004.png"]
    from ddpm_lightning.loading import load_model

    module = load_model(tmp_path / "checkpoints" / "last.ckpt")
    dim = cfg.data.data_shape[0]
    x = module.sample(range(8))
    assert x.shape == (8, dim) and torch.isfinite(x).all()
    assert torch.equal(module.sample([3])[0], x[3])  # per-sample seeds, as for images


def test_toy_data_lie_in_the_unit_box_and_follow_the_mixture():
    dm = ToyDataModule("gaussian_mixture", [1], n_train=20_000, n_val=100, means=[[-3.0], [5.0]], stds=[0.5, 1.0], weights=[0.25, 0.75])
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == (20_000, 1) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == pytest.approx(1.0)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # the map back: x * scale + centre recovers the given means
    raw = x.double().numpy()[:, 0] * dm.scale + dm.centre[0]
    assert raw[y.numpy() == 0].mean() == pytest.approx(-3.0, abs=0.03)
    assert raw[y.numpy() == 1].std() == pytest.approx(1.0, rel=0.03)
    vx, _ = dm.val_set.tensors
    assert vx.shape == (100, 1)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (256, 1)


@pytest.mark.parametrize("dataset", ["moons", "swiss_roll"])
def test_planar_datasets(dataset):
    dm = ToyDataModule(dataset, [2], n_train=1000, n_val=10)
    x = dm.train_points()
    assert x.shape == (1000, 2) and x.abs().max() == pytest.approx(1.0)
    assert x.std(0).min() > 0.2  # both coordinates spread (not a degenerate line)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "spiral"}, "data.dataset='spiral' must be one of"),
        ({"dataset": "moons", "data_shape": [1]}, r"data.dataset=moons is 2-D: set data.data_shape=\[2\]"),
        ({"data_shape": [2, 2]}, r"data.data_shape=\[2, 2\] must be \[dim\]"),
        ({"data_shape": 2}, "data.data_shape=2 must be"),
        ({"batch_size": 0}, "data.batch_size=0 must be a positive integer"),
        ({"n_train": 100, "batch_size": 256}, "data.batch_size=256 is larger than data.n_train=100"),
        ({"n_val": -1}, "data.n_val=-1"),
        ({"noise": -0.1}, "data.noise=-0.1 must be non-negative"),
        ({"dataset": "gaussian_mixture"}, "data.means: give the component means"),
        ({"dataset": "gaussian_mixture", "means": [[0, 0, 0]]}, r"3-D means but data.data_shape=\[2\]"),
        ({"dataset": "gaussian_mixture", "means": [[0, 0], [1, 1]], "stds": [0.1]}, "one value per component"),
        ({"dataset": "gaussian_mixture", "means": [[0, 0], [1, 1]], "stds": [0.1, -1]}, "data.stds=.* must be positive"),
        ({"dataset": "gaussian_mixture", "means": [[0, 0], [1, 1]], "weights": [0.5, 0.6]}, "sum to 1"),
    ],
)
def test_bad_toy_settings_error_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyDataModule(**kwargs)


def test_bad_toy_settings_from_the_command_line_error_before_training(tmp_path):
    cfg = compose_cfg(["experiment=toy2d", "data.dataset=swiss_roll", "data.data_shape=[1]"], tmp_path, tiny=False)
    with pytest.raises(ValueError, match="data.dataset=swiss_roll is 2-D"):
        train(cfg)


def test_module_refuses_data_of_another_shape(tmp_path):
    cfg = compose_cfg(["experiment=toy2d", *FAST], tmp_path, tiny=False)
    cfg.module.data_shape = [1]
    cfg.model.dim = 1
    with pytest.raises(ValueError, match=r"examples have shape \(2,\) .* model is built for \(1,\)"):
        train(cfg)


def test_module_needs_a_data_shape_or_an_image_shape():
    cfg = compose_cfg(["experiment=toy2d"], tiny=False)
    OmegaConf.resolve(cfg)
    cfg.module.data_shape = None
    with pytest.raises(ValueError, match="module.image_size and module.channels"):
        build(cfg.module)
    cfg.module.data_shape = [0]
    with pytest.raises(ValueError, match=r"module.data_shape=\[0\] must be a list of positive integers"):
        build(cfg.module)


def test_mlp_checks_its_input_and_starts_at_zero():
    net = MLP(dim=2, hidden=16, depth=2)
    out = net(torch.randn(5, 2), torch.tensor([3.0]))
    assert out.shape == (5, 2) and torch.all(out == 0)  # zero-initialised output layer
    with pytest.raises(ValueError, match=r"MLP built for \[B, 2\] inputs \(model.dim"):
        net(torch.randn(5, 1, 8, 8), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="model.depth=0"):
        MLP(depth=0)


def test_evaluate_refuses_a_toy_checkpoint(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from helpers.config import CONF
    from ddpm_lightning.tasks import evaluate

    train(compose_cfg(["experiment=toy2d", *FAST, "trainer.max_steps=1", "callbacks.samples.every_n_steps=0"], tmp_path, tiny=False))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ValueError, match=r"models points of shape \(2,\), not images"):
        evaluate(cfg)
