"""Files from users are data, never code: checkpoints, classifier checkpoints, feature caches, statistics and
Inception weights load with weights_only=True, and a stored config may only name allow-listed `_target_`s. Also:
a refused resume leaves the run's config.yaml alone, and evaluation keys its samples by the checkpoint's content."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers.config import CONF, compose_cfg
from ddpm_lightning import checkpointing
from ddpm_lightning import evaluation
from ddpm_lightning import metrics as M
from ddpm_lightning import registry
from ddpm_lightning.checkpointing import AtomicCheckpointIO, read_checkpoint
from ddpm_lightning.evaluation import check_overrides
from ddpm_lightning.loading import load_classifier
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "logger=none"]


@pytest.fixture
def trained(tiny_run):
    return tiny_run


def _copy_run(trained, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(trained[0], dest)
    return dest, dest / "checkpoints" / "last.ckpt"


class Payload:
    """Unpickling this creates `marker`: a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _with_payload(ckpt: Path, dest: Path, marker: Path) -> Path:
    c = torch.load(ckpt, weights_only=True)
    c["callbacks"] = {"innocent": Payload(marker)}
    torch.save(c, dest)
    return dest


def _with_target(ckpt: Path, dest: Path, where: str, target: str, marker: Path) -> Path:
    c = torch.load(ckpt, weights_only=True)
    node = {"_target_": target}
    node.update({"os.system": {"command": f"touch {marker}"}, "builtins.eval": {"_args_": [f"open({str(marker)!r}, 'w')"]}}.get(target, {}))
    if where == "sampler":
        c["hyper_parameters"]["sampler"] = {**node, "_partial_": False}
    else:
        c["hyper_parameters"][where]["extra"] = node  # nested deep inside the net config
    torch.save(c, dest)
    return dest


def eval_cfg(ckpt, *overrides, out=None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = [f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=2", "num_samples=2", "shard_size=2", "batch_size=2",
                "metrics=[]", "grid_size=2", "trainer.accelerator=cpu", f"output_dir={out}" if out else "output_dir=null"]
        return compose(config_name="evaluate", overrides=base + list(overrides))


def _is_model_part(kind: str, obj) -> bool:
    """Whether `obj` is a constructor of a model part of `kind` (and so free of side effects by construction)."""
    import inspect
    import typing

    import lightning as L
    from torch import nn

    from ddpm_lightning.diffusion.schedules import Schedule

    if kind == "net":
        return inspect.isclass(obj) and issubclass(obj, nn.Module)
    if kind == "schedule":
        made = obj if inspect.isclass(obj) else typing.get_type_hints(obj).get("return")
        return inspect.isclass(made) and issubclass(made, Schedule)
    if kind == "sampler":
        return inspect.isfunction(obj) and obj.__module__.startswith("ddpm_lightning.diffusion.samplers.") and \
            list(inspect.signature(obj).parameters)[:3] == ["denoiser", "x", "noise"]
    if kind == "condition":
        return inspect.isclass(obj) and obj.__module__ == "ddpm_lightning.control.conditions" and hasattr(obj, "hint_channels")
    if kind == "data":
        return inspect.isclass(obj) and issubclass(obj, L.LightningDataModule)
    if kind == "optimizer":
        return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)
    if kind == "module":
        return inspect.isclass(obj) and issubclass(obj, L.LightningModule)
    return False


def test_the_registry_lists_only_model_part_constructors():
    assert set(registry.KINDS) == {"net", "schedule", "sampler", "condition", "data", "optimizer", "module"}
    for name, entry in registry.REGISTRY.items():
        assert _is_model_part(entry.kind, entry.resolve()), name
    # what the old allow-list admitted and a stored config must never name: processes, downloads, file writers
    for bad in ("os.system", "builtins.eval", "ddpm_lightning.tasks.os.system", "ddpm_lightning.training.module.torch.load",
                "ddpm_lightning.tasks.train", "ddpm_lightning.cpu.autotune.background", "ddpm_lightning.interop.diffusers.resolve",
                "ddpm_lightning.interop.diffusers.export", "ddpm_lightning.images.save_grid", "ddpm_lightning.plots.save_grid",
                "ddpm_lightning.metrics.cached_features", "ddpm_lightning.physics.figures.main", "torch.load", 3, None):
        assert bad not in registry.REGISTRY, bad
        for kind in registry.KINDS:
            with pytest.raises(ValueError, match="is not a"):
                registry.lookup(bad, kind)
    # a name is refused under another kind: a sampler config cannot name a network
    with pytest.raises(ValueError, match="is not a sampler"):
        registry.lookup("ddpm_lightning.nets.UNet", "sampler")
    # every _target_ of the shipped model-part configs is registered under its group's kind
    kinds = {"model": "net", "schedule": "schedule", "sampler": "sampler", "data": "data", "control": "condition"}
    for path in Path(CONF).rglob("*.yaml"):
        for line in path.read_text().splitlines():
            target = line.split("_target_:", 1)[1].split(",")[0].strip() if "_target_:" in line else ""
            if path.parent.name in kinds and target:
                assert registry.lookup(target, kinds[path.parent.name]), (path, target)


def test_our_checkpoint_loads_weights_only(trained):
    _, ckpt = trained
    assert read_checkpoint(ckpt)["global_step"] == 2
    assert load_model(ckpt).global_step_loaded == 2


def test_pickle_payload_is_refused_everywhere_without_running(trained, tmp_path):
    _, ckpt = trained
    marker = tmp_path / "pwned"
    bad = _with_payload(ckpt, tmp_path / "bad.ckpt", marker)
    torch.save(Payload(marker), tmp_path / "bad.pt")
    attempts = {
        "load_model": lambda: load_model(bad),
        "resume": lambda: train(compose_cfg([*RUN, f"ckpt_path={bad}"], tmp_path / "resume")),
        "evaluate": lambda: evaluate(eval_cfg(bad, out=tmp_path / "eval")),
        "lightning resume": lambda: AtomicCheckpointIO().load_checkpoint(bad),
        "classifier": lambda: load_classifier(bad),
        "feature cache": lambda: M.cached_features(tmp_path / "bad.pt", lambda: {}),
        "stats": lambda: M.load_stats_file(tmp_path / "bad.pt"),
        "inception": lambda: M.resolve_inception_weights(str(tmp_path / "bad.pt"), "inception.weights_path"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ValueError, match="could run code") as e:
            attempt()
        assert "bad." in str(e.value), name
        assert not marker.exists(), f"{name} ran the pickle's code"
    assert not (tmp_path / "resume" / "config.yaml").exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "ddpm_lightning.tasks.os.system"])
def test_foreign_target_is_refused_before_anything_is_built(trained, tmp_path, target):
    run, ckpt = _copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    for where in ("net", "sampler"):
        bad = _with_target(ckpt, tmp_path / f"{where}.ckpt", where, target, marker)
        with pytest.raises(ValueError, match=rf"names _target_ '{target}', which is not allowed") as e:
            load_model(bad)
        assert str(bad) in str(e.value) and not marker.exists()
    before = (run / "config.yaml").read_bytes()
    bad.replace(ckpt)  # the run directory's own last.ckpt: found automatically on resume
    with pytest.raises(ValueError, match="not allowed"):
        train(compose_cfg(RUN, run))
    with pytest.raises(ValueError, match="not allowed"):
        train(compose_cfg([*RUN, "ckpt_path=last"], run))
    with pytest.raises(ValueError, match="not allowed"):
        evaluate(eval_cfg(ckpt))
    assert not marker.exists() and (run / "config.yaml").read_bytes() == before
    assert not (run / "eval").exists() and not (run / "run.lock").exists()


def test_run_config_data_target_is_checked(trained, tmp_path):
    run, ckpt = _copy_run(trained, tmp_path / "run")
    text = (run / "config.yaml").read_text().replace("_target_: ddpm_lightning.data.DigitsDataModule", "_target_: os.system")
    (run / "config.yaml").write_text(text)
    from ddpm_lightning.evaluation import _checkpoint_data_config

    with pytest.raises(ValueError, match=r"config.yaml: data._target_='os.system' is not a data module"):
        _checkpoint_data_config(ckpt)


def test_corrupt_inception_weights_name_the_file_and_key(tmp_path):
    corrupt = tmp_path / "inception.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError, match=rf"{corrupt} \(inception.weights_path\) is not a readable PyTorch Inception weights file"):
        M.resolve_inception_weights(str(corrupt), "inception.weights_path")
    torch.save({"not": "tensors"}, corrupt)
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        M.resolve_inception_weights(str(corrupt), "inception.weights_path")
    torch.save({"w": torch.zeros(2)}, corrupt)
    assert M.resolve_inception_weights(str(corrupt), "inception.weights_path") == str(corrupt)


def test_refused_resume_keeps_config_and_names_the_run_directory(trained, tmp_path):
    run, ckpt = _copy_run(trained, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError) as e:  # found automatically: the hint is about paths.output_dir, not ckpt_path
        train(compose_cfg([*RUN, "model.ch=64"], run))
    msg = str(e.value)
    assert f"paths.output_dir={run}" in msg and "model.ch: checkpoint has 32, config has 64" in msg
    assert "choose another paths.output_dir" in msg and "without ckpt_path" not in msg
    with pytest.raises(ValueError, match=r"(?s)ckpt_path=.*last.ckpt was trained with another model.*without ckpt_path"):
        train(compose_cfg([*RUN, "model.ch=64", "ckpt_path=last"], run))  # `last` gets the same check
    assert (run / "config.yaml").read_bytes() == before and not (run / "run.lock").exists()


def test_replaced_checkpoint_is_resampled(trained, tmp_path):
    run, ckpt = _copy_run(trained, tmp_path / "run")
    evaluate(eval_cfg(ckpt))
    (first,) = (run / "eval").iterdir()
    old = np.load(next((first / "shards").iterdir()))["images"]
    c = torch.load(ckpt, weights_only=True)  # same step, other weights
    c["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in c["state_dict"].items()}
    torch.save(c, ckpt)
    evaluate(eval_cfg(ckpt))
    second = next(d for d in (run / "eval").iterdir() if d != first)
    assert first.name.rsplit("-", 1)[0] == second.name.rsplit("-", 1)[0]  # same step, weights, sampler
    new = np.load(next((second / "shards").iterdir()))["images"]
    assert not np.array_equal(old, new)  # sampled again, from the new weights
    with pytest.raises(ValueError, match="holds samples of another model"):  # an explicit folder is not mixed
        evaluate(eval_cfg(ckpt, out=first))


def test_evaluate_refuses_model_overrides_and_bad_steps(trained):
    _, ckpt = trained
    for arg in ("model.ch=64", "+model.ch=64", "schedule=cosine", "module.parameterization=v"):
        with pytest.raises(ValueError, match="comes from the checkpoint"):
            check_overrides(["sampler=ddim", arg])
    check_overrides(["sampler.steps=10", "hydra.run.dir=.", "--multirun", "data=digits"])
    with pytest.raises(ValueError, match="comes from the checkpoint"):
        evaluate(eval_cfg(ckpt, "+model.ch=64"))
    with pytest.raises(ValueError, match=r"sampler.steps=5000 must lie in \[1, schedule.T=1000\]"):
        evaluate(eval_cfg(ckpt, "sampler.steps=5000", "metrics=[fid]", "inception.weights_path=/nonexistent.pth"))


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    # every file the checkpoint writer opens is a full disk (Linux: writes to /dev/full fail with ENOSPC)
    monkeypatch.setattr(checkpointing, "open", lambda file, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(OSError, match=rf"could not write {path} \(No space left on device\); .* MiB free"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch):
    def disk_full(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation.np, "savez", disk_full)
    path = evaluation.shard_path(tmp_path, 0, 2)
    with pytest.raises(OSError, match=rf"could not write {path} \(No space left on device\)"):
        evaluation.save_shard(path, np.zeros((2, 1, 8, 8), np.uint8), 0, 2, 3)
    assert list(tmp_path.iterdir()) == []
