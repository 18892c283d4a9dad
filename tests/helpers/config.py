"""Configs as the commands compose them: the train config with a tiny CPU setting, the evaluate config."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF = str(Path(__file__).resolve().parents[2] / "conf")

# A run small enough for a test: 8x8 digits, a 2-level U-Net, 10-step DDIM grids.
TINY = [
    "data.image_size=8",
    "data.batch_size=16",
    "model.ch=32",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "module.warmup_steps=2",
    "sampler=ddim",
    "sampler.steps=10",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.samples.every_n_steps=2",
    "callbacks.samples.num_samples=4",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.progress.refresh_rate=0",
]


def compose_cfg(overrides: list[str] = (), output_dir: str | Path | None = None, tiny: bool = True):
    """The train config with `overrides`, as `python train.py ...` would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else ["paths.output_dir=/nonexistent"]
        return compose(config_name="train", overrides=(TINY if tiny else []) + extra + list(overrides))


def eval_cfg(ckpt, out, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = [
            f"ckpt_path={ckpt}", f"output_dir={out}", "sampler=ddim", "sampler.steps=3", "num_samples=6",
            "shard_size=2", "batch_size=2", "metrics=[]", "grid_size=4", "trainer.accelerator=cpu",
        ]
        return compose(config_name="evaluate", overrides=base + list(overrides))
