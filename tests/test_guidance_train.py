"""End to end: the guidance experiments train briefly and write per-class sample grids."""

import pytest
import torch
from PIL import Image

from helpers.config import compose_cfg
from ddpm_lightning.loading import load_classifier
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import train

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
    cfg = {"_target_": "ddpm_lightning.diffusion.guidance.ClassifierFree", "_partial_": True, "w": 2.0}
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


def test_evaluate_samples_the_chosen_labels_with_guidance(runs, tmp_path):
    """evaluate.py's labels / guidance: image i has class labels[i % len] and its seed; the same images as
    DiffusionModule.sample gives for those seeds and labels."""
    import numpy as np

    from ddpm_lightning.images import to_uint8
    from ddpm_lightning.tasks import evaluate
    from helpers.config import eval_cfg

    ckpt = runs / "cfg" / "checkpoints" / "last.ckpt"
    # the leading grid ends at t = 0: three steps of this briefly trained model from t = 999 clip every pixel,
    # guided or not, and the comparison below could not fail
    result = evaluate(eval_cfg(ckpt, tmp_path, "labels=[3,8]", "guidance=classifier_free", "guidance.w=2", "num_samples=4",
                               "sampler.spacing=leading"))
    assert result["num_samples"] == 4
    model = load_model(ckpt)
    guidance = {"_target_": "ddpm_lightning.diffusion.guidance.ClassifierFree", "_partial_": True, "w": 2.0}
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 3, "clip_denoised": True, "spacing": "leading"}
    expected = to_uint8(model.sample(range(4), sampler=sampler, labels=[3, 8, 3, 8], guidance=guidance)).numpy()
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], expected.transpose(0, 2, 3, 1))
    unguided = to_uint8(model.sample(range(4), sampler=sampler, labels=[3, 8, 3, 8])).numpy()
    assert not np.array_equal(unguided, expected)
    with pytest.raises(ValueError, match="labels=all gives 10 labels for num_samples=4"):
        evaluate(eval_cfg(ckpt, tmp_path / "b", "labels=all", "num_samples=4"))
    with pytest.raises(ValueError, match="guidance needs labels"):
        evaluate(eval_cfg(ckpt, tmp_path / "c", "guidance=classifier_free", "num_samples=4"))
