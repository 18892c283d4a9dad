"""CIFAR-10, CelebA and image-folder DataModules on datasets fabricated in the official formats."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from helpers.config import compose_cfg
from helpers.fake_datasets import CELEBA_INSIDE, make_celeba, make_cifar10, make_image_folder
from ddpm_lightning.data import CelebADataModule, CIFAR10DataModule, ImageFolderDataModule
from ddpm_lightning.data.base import BadImage
from ddpm_lightning.images import to_model_range
from ddpm_lightning.tasks import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection fails and is counted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _cifar(root, **kw):
    return CIFAR10DataModule(root=str(root), **{"batch_size": 5, "num_workers": 0, **kw})


# CIFAR-10 ---------------------------------------------------------------------------------------


def test_cifar10_reads_official_pickles_without_download(tmp_path, no_network):
    images, labels = make_cifar10(tmp_path, n_train=50, n_test=10)
    dm = _cifar(tmp_path, download=True, random_flip=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (50, 10)
    assert (dm.channels, dm.num_classes) == (3, 10)
    # pixel-exact: R, G, B planes of each 3072-byte row, scaled to [-1, 1]
    expected = to_model_range(torch.from_numpy(images))
    assert torch.equal(torch.stack([dm.train_set[i][0] for i in range(50)]), expected[:50])
    assert torch.equal(torch.stack([dm.val_set[i][0] for i in range(10)]), expected[50:])
    assert [int(dm.val_set[i][1]) for i in range(10)] == labels[50:]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert no_network == []


def test_cifar10_flip_cache_and_resize(tmp_path):
    make_cifar10(tmp_path)
    dm = _cifar(tmp_path, download=False)
    dm.setup()
    # the float cache is converted once; the data set itself is never flipped (FID references read it)
    assert dm.train_set.images.dtype == torch.float32
    x = dm.train_set.images[0]
    assert all(torch.equal(dm.train_set[0][0], x) for _ in range(5))
    # training batches are flipped per image with probability 1/2 (on_before_batch_transfer, drawn per step: see
    # tests/test_flip_resume.py); the loaders themselves and the validation batches never flip
    draws = dm.on_before_batch_transfer([torch.stack([dm.train_set[0][0]] * 40), torch.zeros(40)], 0)[0]
    assert torch.equal(draws, torch.stack([x] * 40))  # outside a training loop: unflipped
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(training=True, lightning_module=SimpleNamespace(hparams={"seed": None}), world_size=1, global_rank=0)
    draws = dm.on_before_batch_transfer([torch.stack([dm.train_set[0][0]] * 40), torch.zeros(40)], 0)[0]
    dm.trainer = None
    assert all(torch.equal(d, x) or torch.equal(d, x.flip(-1)) for d in draws)
    assert 5 < sum(torch.equal(d, x) for d in draws) < 35
    val = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(val, dm.val_set.images[:5])
    # 50 * 3 * 32 * 32 values: 614 kB as float, 154 kB as uint8 -> a 200 kB budget keeps uint8
    small = _cifar(tmp_path, download=False, random_flip=False, cache_max_gb=200e3 / 2**30)
    small.setup()
    assert small.train_set.images.dtype == torch.uint8
    assert torch.equal(small.train_set[7][0], dm.train_set.images[7])
    resized = _cifar(tmp_path, download=False, image_size=16)
    resized.setup()
    assert resized.train_set[0][0].shape == (3, 16, 16)


def test_cifar10_offline_errors_name_files_url_and_keys(tmp_path, no_network):
    with pytest.raises(FileNotFoundError) as e:
        _cifar(tmp_path, download=False).setup()
    msg = str(e.value)
    for part in ("data_batch_1", "test_batch", str(tmp_path / "cifar-10-batches-py"), CIFAR10.url, "data.root", "data.download"):
        assert part in msg, part
    assert no_network == []
    # download allowed but no network: the same error, saying the download failed
    with pytest.raises(FileNotFoundError, match="download failed") as e:
        _cifar(tmp_path, download=True).prepare_data()
    assert CIFAR10.url in str(e.value) and no_network


def test_cifar10_corrupt_batch_is_named(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        _cifar(tmp_path, download=False).setup()


# CelebA -----------------------------------------------------------------------------------------


def test_celeba_layout_splits_and_ddim_crop(tmp_path, no_network):
    make_celeba(tmp_path, splits=(6, 2, 3))
    dm = CelebADataModule(root=str(tmp_path), download=True, batch_size=2, num_workers=0, val_split="test")
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (6, 3)
    assert (dm.channels, dm.num_classes) == (3, None)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [-1, -1]
    # the fabricated faces are CELEBA_INSIDE exactly on the 128x128 crop: a crop one pixel off would
    # bring in the outside value at the border
    assert (x - (CELEBA_INSIDE / 127.5 - 1)).abs().max() < 2 / 127.5
    assert dm.random_flip  # done per step in on_before_batch_transfer (tests/test_quickstart.py), not by the loader
    valid = CelebADataModule(root=str(tmp_path), download=False, batch_size=2, num_workers=0, val_split="valid", image_size=16, cache="none")
    valid.setup()
    assert len(valid.val_set) == 2 and valid.val_set[0][0].shape == (3, 16, 16)
    assert no_network == []


def test_celeba_missing_annotation_and_wrong_image_are_named(tmp_path, no_network):
    make_celeba(tmp_path)
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        CelebADataModule(root=str(tmp_path), download=False, num_workers=0, batch_size=2).setup()
    for part in ("list_eval_partition.txt", "mmlab.ie.cuhk.edu.hk", "data.root", "data.download"):
        assert part in str(e.value), part
    make_celeba(tmp_path)
    bad = tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"
    Image.new("RGB", (100, 100)).save(bad)
    with pytest.raises(BadImage, match="000002.jpg.*178x218"):
        CelebADataModule(root=str(tmp_path), download=False, num_workers=0, batch_size=2).setup()


# Image folder -----------------------------------------------------------------------------------


def _folder(path, **kw):
    return ImageFolderDataModule(path=str(path), **{"image_size": 16, "batch_size": 2, "num_workers": 0, "val_fraction": 0.0, **kw})


def test_image_folder_class_subfolders_nested_files_and_formats(tmp_path):
    files = make_image_folder(tmp_path, {"cat": 4, "dog": 3, "emu": 2})
    (tmp_path / "LICENSE.txt").write_text("not an image: does not make the folder unlabelled")
    (tmp_path / "no_images").mkdir()  # not a class
    dm = _folder(tmp_path)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.train_set) == 9
    labels = sorted(dm.train_set.labels.tolist())
    assert labels == [0] * 4 + [1] * 3 + [2] * 2
    paths, _, classes = dm.index
    assert classes == ["cat", "dog", "emu"] and set(paths) == {p for ps in files.values() for p in ps}
    assert any("nested/deeper" in str(p) and p.suffix == ".webp" for p in paths)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    gray = _folder(tmp_path, channels=1, val_fraction=0.25, cache="none")
    gray.setup()
    assert (len(gray.train_set), len(gray.val_set)) == (7, 2) and gray.train_set[0][0].shape == (1, 16, 16)


def test_image_folder_unlabelled_and_center_crop(tmp_path):
    # 40x20, black in the outer 6 columns on each side -> resized to 32x16, only the centre 16 columns
    # are free of black (a crop from the left or the right would include it)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 6:34] = 255
    (tmp_path / "more").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "more" / "b.png")
    dm = _folder(tmp_path, random_flip=False)
    dm.setup()
    assert dm.num_classes is None and dm.train_set.labels.tolist() == [-1, -1]
    assert dm.train_set.images.min() > 0.95  # all white after the centre crop


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_image_folder_bad_files_are_named_or_skipped(tmp_path, cache):
    make_image_folder(tmp_path, {"cat": 3, "dog": 3})
    corrupt = tmp_path / "dog" / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(BadImage, match=r"(?s)data.on_bad_image=skip.*broken\.png"):
        _folder(tmp_path, cache=cache).setup()
    small = tmp_path / "cat" / "tiny.jpg"
    Image.new("RGB", (8, 30)).save(small)
    with pytest.warns(UserWarning, match=r"skipped 2 unusable image\(s\)") as w:
        dm = _folder(tmp_path, cache=cache, on_bad_image="skip")
        dm.setup()
    assert "tiny.jpg: 8x30 pixels, smaller than data.image_size=16" in str(w[0].message)
    assert dm.skipped == 2 and len(dm.train_set) == 6


def test_image_folder_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"data.path=.*empty: no images \(.png, .jpg"):
        _folder(tmp_path / "empty").setup()
    with pytest.raises(FileNotFoundError, match="data.path=.*absent is not a directory"):
        _folder(tmp_path / "absent").setup()


# DDP and training -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_shards_covering_the_data_and_reshuffled(tmp_path):
    make_cifar10(tmp_path / "cifar", n_train=40, n_test=8, constant=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_shards.py"), str(tmp_path), str(tmp_path / "cifar")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == 20 and len(set(a)) == len(set(b)) == 20
        assert not set(a) & set(b) and set(a) | set(b) == set(range(40))
    assert seen[0]["0"] != seen[0]["1"]  # a new shuffle (and a new shard) every epoch


def _fabricate(kind, root):
    if kind == "cifar10":
        make_cifar10(root)
        return [f"data.root={root}"]
    if kind == "celeba":
        make_celeba(root, splits=(16, 2, 2))
        return [f"data.root={root}"]
    make_image_folder(root, {"a": 10, "b": 10})
    return [f"data.path={root}", "data.val_fraction=0.2"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cifar10", "celeba", "image_folder"])
def test_twenty_training_steps_on_fabricated_data(tmp_path, kind, no_network):
    # images resized to 8x8 (the TINY model); CIFAR-10's 32x32 are downsampled at setup
    overrides = [f"data={kind}", *_fabricate(kind, tmp_path / "data"), "data.image_size=8", "data.batch_size=4", "data.num_workers=0"]
    overrides += ["data.download=false"] if kind != "image_folder" else []
    overrides += [
        "trainer.max_steps=20", "trainer.val_check_interval=20", "callbacks.samples.every_n_steps=20",
        "callbacks.checkpoint.every_n_train_steps=20", "logger=none",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    assert (tmp_path / "run" / "samples" / "step_0000020.png").is_file()
