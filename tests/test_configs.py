"""Every option of every config group composes and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import CONF, compose_cfg
from ddpm_lightning.compose import resolve_precision


def options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def build(cfg):
    OmegaConf.resolve(cfg)
    return instantiate(cfg.module)


@pytest.mark.parametrize("group", ["model", "schedule", "sampler"])
def test_module_groups_instantiate(group):
    assert options(group), group
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "model":
            overrides += ["data.image_size=32"] if option != "unet_celeba64" else ["data.image_size=64"]
            if option == "mlp":  # the MLP is for points
                overrides = ["data=toy2d", "model=mlp"]
        # TINY picks sampler=ddim with steps=10; it would clash with the other sampler options
        module = build(compose_cfg(overrides, tiny=(group == "schedule")))
        assert getattr(module.net, "in_channels", None) == 1 or module.data_shape == (2,)
        assert callable(module.sampler)


def test_data_options_instantiate():
    for option in options("data"):
        cfg = compose_cfg([f"data={option}"], tiny=not option.startswith("toy"))  # TINY sets image options
        dm = instantiate(cfg.data)
        assert dm.hparams.batch_size == cfg.data.batch_size


def test_logger_callback_and_trainer_options_instantiate(tmp_path):
    for option in options("logger"):
        cfg = compose_cfg([f"logger={option}"], tmp_path / option)
        OmegaConf.resolve(cfg)
        loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
        assert len(loggers) == (0 if option == "none" else 1)
    for option in options("callbacks"):
        cfg = compose_cfg([f"callbacks={option}"], tmp_path)
        assert all(instantiate(c) is not None for c in cfg.callbacks.values())
    for option in options("trainer"):
        cfg = compose_cfg([f"trainer={option}", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path)
        resolve_precision(cfg.trainer)  # as tasks.train does: `auto` is ours, not Lightning's
        assert instantiate(cfg.trainer).max_steps == cfg.trainer.max_steps


def test_wandb_logger_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    OmegaConf.resolve(cfg)
    logger = instantiate(cfg.logger.wandb)
    assert logger._offline is True


def test_design_card_example_composes():
    # `python train.py model=unet_small schedule=linear`
    cfg = compose_cfg(["model=unet_small", "schedule=linear"], tiny=False)
    assert cfg.model.ch == 32 and cfg.schedule.T == 1000 and cfg.data._target_.endswith("DigitsDataModule")


def test_precision_auto_is_bf16_mixed_on_a_bf16_gpu_and_fp32_elsewhere(monkeypatch):
    from helpers.config import compose_cfg
    from ddpm_lightning.compose import auto_precision, resolve_precision

    assert compose_cfg().trainer.precision == "auto"  # the default
    assert auto_precision("auto", cuda=True, bf16=True) == auto_precision("gpu", cuda=True, bf16=True) == "bf16-mixed"
    assert auto_precision("auto", cuda=True, bf16=False) == "32-true"  # V100, T4: fp16 needs a loss scaler, a choice
    assert auto_precision("cpu", cuda=True, bf16=True) == auto_precision("auto", cuda=False) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = compose_cfg()
    resolve_precision(cfg.trainer)
    assert cfg.trainer.precision == "bf16-mixed"
    cfg = compose_cfg(["trainer.precision=32-true"])  # an explicit choice stays
    resolve_precision(cfg.trainer)
    assert cfg.trainer.precision == "32-true"


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once_naming_the_faster_setting(monkeypatch, caplog, accelerator):
    from ddpm_lightning import compose

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native = {"value": False}
    monkeypatch.setattr(compose, "cpu_native_bf16", lambda: native["value"], raising=False)

    def warnings_for(precision: str) -> list[str]:
        caplog.clear()
        cfg = compose_cfg([f"trainer.precision={precision}", f"trainer.accelerator={accelerator}"])
        with caplog.at_level("WARNING", logger="ddpm_lightning.compose"):
            resolve_precision(cfg.trainer)
        assert cfg.trainer.precision == ("32-true" if precision == "auto" else precision)  # the choice stays
        return [r.getMessage() for r in caplog.records if r.name == "ddpm_lightning.compose" and r.levelname == "WARNING"]

    slow = warnings_for("bf16-mixed")
    assert len(slow) == 1 and "\n" not in slow[0]
    assert "avx512_bf16" in slow[0] and "AMX" in slow[0] and "trainer.precision=32-true" in slow[0]
    assert warnings_for("32-true") == warnings_for("auto") == []
    native["value"] = True  # avx512_bf16 or AMX: bf16 pays, nothing to say
    assert warnings_for("bf16-mixed") == []
    native["value"] = None  # cannot tell (not x86): nothing said
    assert warnings_for("bf16-mixed") == []


def test_cpu_native_bf16_follows_torchs_cpu_feature_queries(monkeypatch):
    from ddpm_lightning import compose

    monkeypatch.setattr(compose.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, native in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert compose.cpu_native_bf16() is native
    monkeypatch.setattr(compose.platform, "machine", lambda: "aarch64")
    assert compose.cpu_native_bf16() is None
