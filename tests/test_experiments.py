"""Every conf/experiment/*.yaml composes and builds its module and datamodule, and one batch of its data
goes through its model's loss. Real-data experiments run on datasets fabricated in the official formats."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import CONF, compose_cfg
from helpers.fake_datasets import make_celeba, make_cifar10, make_image_folder
from ddpm_lightning.compose import build

# controlnet_* need a trained base checkpoint: tests/test_controlnet.py builds and trains them on one.
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml") if not p.stem.startswith("controlnet_"))


pytestmark = pytest.mark.usefixtures("one_thread")


def fabricate(target: str, root: Path) -> list[str]:
    """Overrides pointing the experiment's data at a tiny fabricated copy (none for embedded data)."""
    name = target.rsplit(".", 1)[-1]
    if name == "CIFAR10DataModule":
        make_cifar10(root)
        return [f"data.root={root}", "data.download=false", "data.batch_size=4"]
    if name == "CelebADataModule":
        make_celeba(root)
        return [f"data.root={root}", "data.download=false", "data.batch_size=4"]
    if name == "ImageFolderDataModule":
        make_image_folder(root, {"a": 4, "b": 4}, size=(72, 72))
        return [f"data.path={root}", "data.batch_size=4"]
    return []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_and_trains_on_one_batch(name, tmp_path):
    target = compose_cfg([f"experiment={name}"], tmp_path, tiny=False).data._target_
    cfg = compose_cfg([f"experiment={name}", *fabricate(target, tmp_path / "data"), "data.num_workers=0"], tmp_path, tiny=False)
    OmegaConf.resolve(cfg)
    module, dm = build(cfg.module), build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == module.data_shape and (x.ndim == 2 or x.shape[1] == dm.channels)  # points or images
    assert x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long
    batch = (x[:2], y[:2])  # two examples: the full-size U-Nets are slow on CPU
    losses = module._loss(batch)[0]["loss"] if hasattr(module, "_loss") else module._step(batch)[0]  # diffusion / classifier
    assert torch.isfinite(losses).all()


def test_ddpm_cifar10_is_the_papers_setting():
    """Ho et al. 2020 App. B."""
    cfg = compose_cfg(["experiment=ddpm_cifar10"], tiny=False)
    assert cfg.data._target_.endswith("CIFAR10DataModule") and cfg.data.random_flip and cfg.data.batch_size == 128
    assert (cfg.module.optimizer.lr, cfg.module.warmup_steps, cfg.trainer.gradient_clip_val) == (2e-4, 5000, 1.0)
    assert (cfg.callbacks.ema.decay, cfg.trainer.max_steps, cfg.model.dropout) == (0.9999, 800000, 0.1)
    assert cfg.sampler._target_.endswith("ddpm") and cfg.sampler.variance == "fixed_large"
    assert (cfg.schedule.T, cfg.schedule.beta_start, cfg.schedule.beta_end) == (1000, 1e-4, 0.02)
    OmegaConf.resolve(cfg)
    net = build(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


def test_ddpm_celeba64_setting():
    cfg = compose_cfg(["experiment=ddpm_celeba64"], tiny=False)
    assert cfg.data._target_.endswith("CelebADataModule") and cfg.data.image_size == 64 and cfg.data.random_flip
    assert list(cfg.model.ch_mult) == [1, 2, 2, 2, 4] and cfg.model.dropout == 0.1
    assert (cfg.module.optimizer.lr, cfg.module.warmup_steps, cfg.trainer.gradient_clip_val) == (2e-4, 5000, 1.0)
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.data.batch_size == 128


def test_the_quickstart_is_the_run_its_numbers_were_measured_on(monkeypatch):
    """experiment=quickstart trains what benchmarks/quickstart_budget.py measured as variant flow_12_1000 (experiment=digits
    with its overrides, 1000 steps; docs/objectives.md#the-quickstart): change one and the other's numbers go stale."""
    monkeypatch.syspath_prepend(str(Path(CONF).parent / "benchmarks"))
    from quickstart_budget import VARIANTS

    overrides, steps, _ = VARIANTS["flow_12_1000"]
    quickstart = compose_cfg(["experiment=quickstart"], tiny=False)
    measured = compose_cfg(["experiment=digits", *overrides, f"trainer.max_steps={max(steps)}"], tiny=False)
    for key in ("model", "schedule", "data", "module", "seed", "trainer.max_steps", "trainer.precision", "callbacks.ema"):
        assert OmegaConf.select(quickstart, key) == OmegaConf.select(measured, key), key
