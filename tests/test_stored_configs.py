"""Files are data: no config read back from a file (a checkpoint's hyper-parameters, a run's config.yaml, a
diffusers folder's JSON) and no pickled data batch can run code or choose what gets built beyond the model parts
of ddpm_lightning.registry. Each payload below names a marker folder; the marker must never appear, and the
refusal must name the file and the key (docs/security.md)."""

from __future__ import annotations

import copy
import json
import pathlib
import pickle
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers.config import CONF, compose_cfg
from helpers.fake_datasets import make_cifar10
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "logger=none"]


@pytest.fixture
def trained(tiny_run):
    return tiny_run


def side_effect_net(marker: Path) -> dict:
    """Package functions with side effects as a network config: a subprocess running Python, and a download."""
    return {
        "_target_": "ddpm_lightning.cpu.autotune.background",
        "code": f"import os; os.mkdir({str(marker)!r})",
        "log_path": {"_target_": "ddpm_lightning.interop.diffusers.resolve", "source": "/dev/null"},
    }


def interpolation(marker: Path) -> str:
    """An OmegaConf interpolation that, once resolved and instantiated, calls os.mkdir(marker)."""
    return "${oc.create:{_target_: os.mkdir, path: " + str(marker) + "}}"


def with_hparams(ckpt: Path, dest: Path, edit) -> Path:
    c = torch.load(ckpt, weights_only=True)
    edit(c["hyper_parameters"])
    torch.save(c, dest)
    return dest


def copy_run(trained, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(trained[0], dest)
    return dest, dest / "checkpoints" / "last.ckpt"


def eval_cfg(*overrides, out=None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = ["sampler=ddim", "sampler.steps=2", "num_samples=2", "shard_size=2", "batch_size=2", "metrics=[]",
                "grid_size=2", "trainer.accelerator=cpu", f"output_dir={out}" if out else "output_dir=null"]
        return compose(config_name="evaluate", overrides=base + list(overrides))


def refused(attempt, *names: str, marker: Path) -> str:
    """Run `attempt`, which must raise a ValueError naming each of `names`, without creating `marker` (also after
    a moment: a payload started in a subprocess would create it late)."""
    with pytest.raises(ValueError) as e:
        attempt()
    time.sleep(0.05)
    assert not marker.exists(), f"the payload ran: {e.value}"
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    return str(e.value)


def test_side_effect_functions_are_refused_at_every_entry_point(trained, tmp_path):
    from ddpm_lightning.control.module import ControlNetModule
    from ddpm_lightning.loading import load_classifier

    run, ckpt = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = side_effect_net(marker)
    bad = with_hparams(ckpt, tmp_path / "bad.ckpt", lambda hp: hp.update(net=payload))

    def controlnet_of(hp):  # a ControlNet checkpoint whose base network is the payload
        hp["net"] = {"_target_": "ddpm_lightning.nets.controlnet.ControlledUNet", "_recursive_": False, "base": payload,
                     "condition": {"_target_": "ddpm_lightning.control.conditions.LowRes"}, "hint_widths": [16, 32]}

    controlnet = with_hparams(ckpt, tmp_path / "controlnet.ckpt", controlnet_of)
    classifier = with_hparams(ckpt, tmp_path / "classifier.ckpt", lambda hp: (hp.pop("sampler"), hp.update(net=payload)))
    attempts = {
        "load_model": (lambda: load_model(bad), bad),
        "evaluate": (lambda: evaluate(eval_cfg(f"ckpt_path={bad}", out=tmp_path / "e1")), bad),
        "resume": (lambda: train(compose_cfg([*RUN, f"ckpt_path={bad}"], tmp_path / "resume")), bad),
        "ControlNet base_ckpt": (lambda: ControlNetModule(
            base_ckpt=str(bad), condition={"_target_": "ddpm_lightning.control.conditions.LowRes"},
            optimizer={"_target_": "torch.optim.Adam", "_partial_": True}, image_size=8, channels=1), bad),
        "ControlNet checkpoint's base": (lambda: load_model(controlnet), controlnet),
        "evaluate a ControlNet checkpoint": (lambda: evaluate(eval_cfg(f"ckpt_path={controlnet}", out=tmp_path / "e2")), controlnet),
        "classifier guidance": (lambda: load_classifier(classifier), classifier),
    }
    for name, (attempt, path) in attempts.items():
        message = refused(attempt, str(path), "ddpm_lightning.cpu.autotune.background", marker=marker)
        assert "not allowed" in message, name
    # the run's config.yaml naming the payload as its data module
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = payload
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(lambda: evaluate(eval_cfg(f"ckpt_path={ckpt}", "metrics=[nll]", out=tmp_path / "e3")),
            str(run / "config.yaml"), "data._target_", marker=marker)
    assert not (tmp_path / "e1").exists() and not (tmp_path / "resume" / "config.yaml").exists()


def _fields(tree: dict, prefix: str = ""):
    """Every leaf key path of a nested config, special keys left out."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _fields(v, f"{prefix}{k}.")
        elif not k.startswith("_"):
            yield f"{prefix}{k}"


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        tree = tree[p]
    tree[last] = value


def test_interpolation_in_any_stored_field_is_refused_naming_it(trained, tmp_path):
    _, ckpt = trained
    marker = tmp_path / "pwned"
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    fields = [f for section in ("net", "schedule", "sampler", "optimizer") for f in _fields(hp[section], f"{section}.")]
    fields += ["image_size", "seed", "parameterization"]
    assert {"net.dropout", "net.ch", "schedule.T", "sampler.steps", "optimizer.lr"} <= set(fields)
    for field in fields:
        bad = with_hparams(ckpt, tmp_path / "bad.ckpt", lambda h: _set(h, field, interpolation(marker)))
        message = refused(lambda: load_model(bad), str(bad), f"hyper_parameters.{field}=", marker=marker)
        assert "interpolation" in message
    # also where Lightning resumes and where evaluate.py reads the checkpoint
    bad = with_hparams(ckpt, tmp_path / "bad.ckpt", lambda h: _set(h, "schedule.T", interpolation(marker)))
    refused(lambda: train(compose_cfg([*RUN, f"ckpt_path={bad}"], tmp_path / "resume")), "hyper_parameters.schedule.T", marker=marker)
    refused(lambda: evaluate(eval_cfg(f"ckpt_path={bad}", out=tmp_path / "e")), "hyper_parameters.schedule.T", marker=marker)


def test_interpolation_in_a_run_config_yaml_is_refused_naming_it(trained, tmp_path):
    run, ckpt = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    original = yaml.safe_load((run / "config.yaml").read_text())
    for field in [*_fields(original["data"]), "extra"]:
        cfg = copy.deepcopy(original)
        _set(cfg["data"], field, interpolation(marker))
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        refused(lambda: evaluate(eval_cfg(f"ckpt_path={ckpt}", "metrics=[nll]", out=tmp_path / "e")),
                str(run / "config.yaml"), f"data.{field}=", marker=marker)
    (run / "config.yaml").write_text(yaml.safe_dump(original))  # the run's own config still evaluates
    result = evaluate(eval_cfg(f"ckpt_path={ckpt}", "metrics=[nll]", "nll.max_images=2", "nll.estimators=[vlb]", out=tmp_path / "ok"))
    assert result["metrics"]["nll/vlb/bpd"] > 0


def test_a_stored_data_config_never_downloads(tmp_path):
    from ddpm_lightning import registry

    stored = {"_target_": "ddpm_lightning.data.CIFAR10DataModule", "root": str(tmp_path), "download": True, "image_size": 8}
    assert registry.build(stored, "data", "run config").download is False  # forced for configs read from files
    assert registry.build(stored, "data", "run config", stored=False).download is True


# ---------------------------------------------------------------------------------------------- diffusers JSON

UNET = {
    "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1, "downsample_padding": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "freq_shift": 1,
    "flip_sin_to_cos": False, "attention_head_dim": None, "act_fn": "silu",
}
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "num_train_timesteps": 1000, "variance_type": "fixed_large", "clip_sample": True, "prediction_type": "epsilon"}


@pytest.fixture
def pipe(tmp_path):
    """A DDPMPipeline folder written by diffusers (random weights)."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(**{k: v for k, v in UNET.items() if not k.startswith("_")})
    scheduler = diffusers.DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def _edit_json(path: Path, key: str, value) -> None:
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))


def test_interpolation_in_a_diffusers_config_is_refused_naming_file_and_key(pipe, tmp_path):
    from ddpm_lightning.interop import diffusers as io

    marker = tmp_path / "pwned"
    assert io.import_config(pipe)[0]["net"]["ch"] == 32  # the folder as written imports
    for file, keys in (("unet/config.json", UNET), ("scheduler/scheduler_config.json", SCHEDULER)):
        original = (pipe / file).read_text()
        for key in [k for k in keys if not k.startswith("_")] + ["extra"]:
            _edit_json(pipe / file, key, interpolation(marker))
            refused(lambda: io.import_config(pipe), str(pipe / file), f"{key}=", marker=marker)
            (pipe / file).write_text(original)
    # through the commands: evaluate.py init_from= and train.py init_from=
    for file, key in (("unet/config.json", "layers_per_block"), ("unet/config.json", "norm_num_groups"),
                      ("scheduler/scheduler_config.json", "beta_start")):
        original = (pipe / file).read_text()
        _edit_json(pipe / file, key, interpolation(marker))
        refused(lambda: evaluate(eval_cfg(f"init_from={pipe}", out=tmp_path / "e")), str(pipe / file), key, marker=marker)
        cfg = compose_cfg([*RUN, f"init_from={pipe}", "data.image_size=8"], tmp_path / "t")
        refused(lambda: train(cfg), str(pipe / file), key, marker=marker)
        (pipe / file).write_text(original)


def test_a_diffusers_config_of_wrong_types_is_refused_naming_the_file(pipe):
    from ddpm_lightning.interop import diffusers as io

    for key, value in (("layers_per_block", "2"), ("block_out_channels", "abc"), ("norm_eps", [1]), ("sample_size", True)):
        original = (pipe / "unet" / "config.json").read_text()
        _edit_json(pipe / "unet" / "config.json", key, value)
        with pytest.raises(ValueError, match="config.json"):
            io.import_config(pipe)
        (pipe / "unet" / "config.json").write_text(original)
    (pipe / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a JSON list, not an object"):
        io.import_config(pipe)


# ---------------------------------------------------------------------------------------------- pickled data


class Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.mkdir, (pathlib.Path(self.marker),))


def test_cifar10_batches_are_read_as_data_only(trained, tmp_path):
    from ddpm_lightning.data.cifar10 import read_cifar10_batches

    images, labels = make_cifar10(tmp_path / "cifar")  # the official format, made here
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    x, y = read_cifar10_batches(folder, [f"data_batch_{k}" for k in range(1, 6)])
    assert torch.equal(x, torch.from_numpy(images[:50])) and y.tolist() == labels[:50]
    marker = tmp_path / "pwned"
    entry = pickle.loads((folder / "test_batch").read_bytes())
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({**entry, "labels": Payload(marker)}, f, protocol=2)
    refused(lambda: read_cifar10_batches(folder, ["test_batch"]), str(folder / "test_batch"), "not a plain CIFAR-10 python batch", marker=marker)
    # through evaluate.py metrics=[nll], the run's config.yaml naming that folder
    run, ckpt = copy_run(trained, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = {"_target_": "ddpm_lightning.data.CIFAR10DataModule", "root": str(tmp_path / "cifar"), "image_size": 8, "download": False}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(lambda: evaluate(eval_cfg(f"ckpt_path={ckpt}", "metrics=[nll]", out=tmp_path / "e")), str(folder / "test_batch"), marker=marker)


def test_an_object_array_in_a_cifar10_batch_is_refused(tmp_path):
    import numpy as np

    from ddpm_lightning.data.cifar10 import read_cifar10_batches

    make_cifar10(tmp_path / "cifar")
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.array([1, "a"], dtype=object), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1"):
        read_cifar10_batches(folder, ["data_batch_1"])


# ---------------------------------------------------------------------------------------------- mutations


FOREIGN = ["os.system", "builtins.exec", "ddpm_lightning.cpu.autotune.background", "ddpm_lightning.images.save_grid",
           "ddpm_lightning.diffusion.samplers.ddim", "ddpm_lightning.nets.UNet", "torch.optim.Adam", "ddpm_lightning.data.DigitsDataModule"]


def _paths(tree, prefix=()):
    """Every key path of a nested dict (inner nodes too)."""
    for k, v in tree.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _mutation(rng: random.Random, marker: Path):
    return rng.choice([
        "abc", "", 3.5, -1, 0, 1, 2, True, None, [], [1, "x"], [[1]], {}, {"a": 1}, "1e-3", 1e300,
        {"_target_": rng.choice(FOREIGN), "path": str(marker)}, interpolation(marker), "${oc.env:HOME}",
    ])


def test_random_mutations_of_stored_hyperparameters_load_the_same_model_or_are_refused_clearly(trained, tmp_path):
    """A few hundred random edits of a valid checkpoint's hyper-parameters (wrong types, foreign and misplaced
    names, nested targets, interpolations, unknown keys): each loads a model with the checkpoint's weights, or is
    refused with a ValueError naming the file; never another exception, never a side effect."""
    _, ckpt = trained
    marker = tmp_path / "pwned"
    full = torch.load(ckpt, weights_only=True)
    original = {k: full[k] for k in ("hyper_parameters", "state_dict", "global_step")}  # what load_model reads
    state = original["state_dict"]
    rng = random.Random(0)
    paths = list(_paths(original["hyper_parameters"]))
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        c = copy.deepcopy(original)
        node = c["hyper_parameters"]
        *parents, last = rng.choice(paths) if rng.random() < 0.9 else ("net", f"unknown_{i}")
        for p in parents:
            node = node[p]
        node[last] = _mutation(rng, marker)
        bad = tmp_path / "mutated.ckpt"
        torch.save(c, bad)
        try:
            module = load_model(bad, use_ema=True)
        except ValueError as e:
            assert str(bad) in str(e), (parents, last, str(e))
            outcomes["refused"] += 1
        else:
            loaded = module.state_dict()
            assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), (parents, last)
            outcomes["loaded"] += 1
        assert not marker.exists(), (parents, last)
    print(outcomes)
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 5, outcomes


def test_user_code_can_register_its_own_network_and_files_cannot(monkeypatch):
    from torch import nn

    from ddpm_lightning import registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # this test's registrations only
    stored = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}
    with pytest.raises(ValueError, match="is not a network"):
        registry.build(stored, "net", "checkpoint x")
    registry.register("torch.nn.Linear", "net", "torch.nn:Linear")
    assert isinstance(registry.build(stored, "net", "checkpoint x"), nn.Linear)
    with pytest.raises(ValueError, match=r"checkpoint x: net.in_features='2' must be int"):
        registry.build({**stored, "in_features": "2"}, "net", "checkpoint x")
    with pytest.raises(ValueError, match="kind='module'"):
        registry.register("x.Y", "module", "x:Y")
