"""End to end: the guidance experiments train briefly and write per-class sample grids."""

import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from ddpm_lightning.guidance import load_classifier
from ddpm_lightning.tasks import load_model, train

pytestmark = pytest.mark.slow

SMALL = ["model.ch_mult=[1,2]", "logger=none", "trainer.max_steps=2", "callbacks.samples.num_samples=20"]
CLASSIFIER = [
    "experiment=classifier_digits", "model.ch_mult=[1,2]", "logger=none", "data.batch_size=16", "trainer.max_steps=2",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.progress.refresh_rate=0",
]


def grid_rows_and_columns(path, size=8 * 4, pad=2):
    w, h = Image.open(path).size
    return (h - pad) // (size + pad), (w - pad) // (size + pad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance")
    train(compose_cfg(["experiment=cfg_digits"] + SMALL, root / "cfg"))
    train(compose_cfg(CLASSIFIER, root / "classifier", tiny=False))
    return root


def test_cfg_digits_trains_and_samples_one_row_per_class(runs):
    grid = runs / "cfg" / "samples" / "step_0000002.png"
    assert grid_rows_and_columns(grid) == (10, 2)
    model = load_model(runs / "cfg" / "checkpoints" / "last.ckpt")
    assert model.hparams.p_uncond == 0.1 and model.net.num_classes == 10
    cfg = {"_target_": "ddpm_lightning.guidance.ClassifierFree", "_partial_": True, "w": 2.0}
    batch = model.sample([0, 1, 2], labels=[4, 7, 7], guidance=cfg)
    assert torch.allclose(model.sample([1], labels=[7], guidance=cfg), batch[1:2], atol=1e-5)


def test_classifier_guidance_digits_uses_the_trained_classifier(runs, tmp_path):
    clf_ckpt = runs / "classifier" / "checkpoints" / "last.ckpt"
    assert load_classifier(clf_ckpt).num_classes == 10
    train(compose_cfg(["experiment=classifier_guidance_digits", f"guidance.classifier={clf_ckpt}"] + SMALL, tmp_path / "cg"))
    assert grid_rows_and_columns(tmp_path / "cg" / "samples" / "step_0000002.png") == (10, 2)


def test_bad_classifier_checkpoints_fail_before_training(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="guidance.classifier"):
        train(compose_cfg(["experiment=classifier_guidance_digits", f"guidance.classifier={tmp_path / 'no.ckpt'}"] + SMALL, tmp_path / "a"))
    assert not (tmp_path / "a" / "checkpoints").exists()
    with pytest.raises(ValueError, match="not a classifier"):
        load_classifier(runs / "cfg" / "checkpoints" / "last.ckpt")
