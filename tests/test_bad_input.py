"""Bad input gets a clear error naming the key or file, before compute is spent or where it is met: a truncated
image without a cache (skipped or named mid-training), config values of the wrong type."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.config import compose_cfg, eval_cfg
from ddpm_lightning import evaluation
from ddpm_lightning.data import ImageFolderDataModule
from ddpm_lightning.data.base import BadImage
from ddpm_lightning.diffusion.guidance import resolve_labels
from ddpm_lightning.compose import build
from ddpm_lightning.tasks import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder_with_truncated_png(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    bad = root / "3.png"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact: passes the setup check
    return bad


def _dm(path: Path, **kw) -> ImageFolderDataModule:
    return ImageFolderDataModule(path=str(path), image_size=8, batch_size=4, num_workers=0, val_fraction=0.0,
                                 cache="none", random_flip=False, **kw)


def test_truncated_image_without_cache_is_named_mid_training(tmp_path):
    bad = _folder_with_truncated_png(tmp_path / "images")
    dm = _dm(tmp_path / "images")
    dm.setup()  # only headers are read at setup
    with pytest.raises(BadImage, match=rf"{bad}: not a readable image.*set data.on_bad_image=skip"):
        [dm.train_set[i] for i in range(len(dm.train_set))]


def test_truncated_image_without_cache_is_skipped_with_a_count(tmp_path):
    bad = _folder_with_truncated_png(tmp_path / "images")
    dm = _dm(tmp_path / "images", on_bad_image="skip")
    dm.setup()
    with pytest.warns(UserWarning, match=r"skipped 1 unusable image\(s\) \(data.on_bad_image=skip, 1 so far"):
        items = [dm.train_set[i] for i in range(len(dm.train_set))]
    i = sorted(dm.train_set.files.paths).index(bad)
    assert dm.train_set.skipped == 1 and torch.equal(items[i][0], items[(i + 1) % len(items)][0])  # the next image
    # and a training run over the folder goes through its epochs instead of stopping mid-loop
    cfg = compose_cfg(["data=image_folder", f"data.path={tmp_path / 'images'}", "data.image_size=8", "data.batch_size=4",
                       "data.cache=none", "data.on_bad_image=skip", "data.num_workers=0", "data.val_fraction=0",
                       "trainer.max_steps=5", "trainer.limit_val_batches=0", "callbacks.samples.every_n_steps=0",
                       "logger=none"], tmp_path / "run")
    with pytest.warns(UserWarning, match="skipped 1 unusable"):
        train(cfg)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=abc", "data.batch_size='abc' must be int"),
        ("data.image_size=1.5", "data.image_size=1.5 must be int"),
        ("data.batch_size=true", "data.batch_size=True must be int"),
        ("module.warmup_steps=ten", "module.warmup_steps='ten' must be int"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_key(override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(cfg.data)
        build(cfg.module)


def test_grid_sampler_steps_beyond_T_fail_at_setup(tmp_path):
    cfg = compose_cfg(["callbacks.samples.sampler={_target_:ddpm_lightning.diffusion.samplers.ddim,_partial_:true,steps:5000}",
                       "logger=none"], tmp_path)
    with pytest.raises(ValueError, match=r"callbacks.samples.sampler: sampler.steps=5000 must lie in \[1, schedule.T=1000\]"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["guidance=classifier_free", "guidance.w=nan"], "guidance.w=nan must be a finite number"),
        (["guidance=classifier_free", "guidance.w=inf"], "guidance.w=inf must be a finite number"),
        (["sampler.eta=nan"], "sampler.eta=nan must be a number"),
        (["sampler.eta=inf"], "sampler.eta=inf must be a finite non-negative number"),
    ],
)
def test_non_finite_sampling_settings_are_refused_before_sampling(tiny_run, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluation.make_plan(eval_cfg(tiny_run[1], tmp_path / "eval", "labels=[0]", *overrides))


def test_non_finite_samples_stop_the_evaluation_instead_of_writing_black_images(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run[1], weights_only=True)
    for state in (ckpt["state_dict"], ckpt["current_model_state"]):
        for name, value in state.items():
            if name.startswith("net.") and value.is_floating_point():
                value.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(FloatingPointError, match=r"samples of seeds 0..1 are not finite"):
        evaluate(eval_cfg(tmp_path / "nan.ckpt", tmp_path / "eval", "num_samples=2"))
    assert not list((tmp_path / "eval" / "shards").glob("*.npz"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampler.steps=2.5"], "sampler.steps=2.5 must be int"),
        (["sampler.steps=abc"], "sampler.steps='abc' must be int"),
        (["num_samples=2.5"], "num_samples=2.5 must be a positive integer"),
        (["num_samples=abc"], "num_samples='abc' must be a positive integer"),
        (["guidance=classifier_free", "guidance.w=abc", "labels=[0]"], "guidance.w='abc' must be a finite number"),
        (["use_ema=maybe"], "use_ema='maybe' must be true or false"),
    ],
)
def test_evaluation_settings_of_the_wrong_type_name_the_key_before_sampling(tiny_run, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluation.make_plan(eval_cfg(tiny_run[1], tmp_path / "eval", *overrides))


@pytest.mark.parametrize("labels", [["abc"], [1.5], [10], [3, -1], [True]])
def test_labels_that_are_not_class_indices_are_refused_before_sampling(labels):
    with pytest.raises(ValueError, match=r"labels=\[.*\]: .* is not a class index in \[0, 9\]"):
        resolve_labels(labels, 4, 10)
