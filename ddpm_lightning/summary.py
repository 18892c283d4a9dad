"""What a run prints when it ends: where its outputs are and the exact commands for the next steps."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint

from ddpm_lightning import registry
from ddpm_lightning.diffusion.samplers import check_compatible
from ddpm_lightning.training.callbacks import SampleGrid

# Overrides a follow-up command must not repeat: they name this run's files or are replaced by the command.
_RUN_KEYS = ("ckpt_path", "hydra.run.dir", "paths.output_dir", "trainer.max_steps")


def cli_overrides() -> list[str]:
    """The Hydra overrides of this process's command line (`python train.py a=b c=d` -> [a=b, c=d]); [] when not
    run through Hydra (e.g. `tasks.train(cfg)` called from Python)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig not set
        return []


def command(script: str, *args: str) -> str:
    """A shell command line, each argument quoted where the shell needs it (e.g. 'metrics=[fid,isc]')."""
    return " ".join(["python", script, *(shlex.quote(a) for a in args if a)])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _keep(overrides: Sequence[str], drop: Sequence[str] = _RUN_KEYS) -> list[str]:
    """The overrides except those of the keys `drop` and their sub-keys."""
    return [o for o in overrides if not any(_key(o) == d or _key(o).startswith(d + ".") for d in drop)]


_OTHER_SAMPLERS = (("ddim", ["sampler=ddim", "sampler.steps=50"]), ("ddpm", ["sampler=ddpm"]), ("pc", ["sampler=pc"]))


def other_sampler(sampler_cfg: Mapping | None, schedule: Any = None) -> list[str]:
    """Overrides choosing a sampler other than `sampler_cfg` that `schedule` accepts: DDIM with 50 steps, else
    ancestral DDPM sampling (discrete DDPM schedules), else predictor-corrector."""

    current = str((sampler_cfg or {}).get("_target_", "")).rsplit(".", 1)[-1]
    for name, overrides in _OTHER_SAMPLERS:
        if name == current:
            continue
        try:
            if schedule is not None:
                check_compatible(registry.build({"_target_": f"ddpm_lightning.diffusion.samplers.{name}"}, "sampler"), schedule)
        except ValueError:
            continue
        return overrides
    return []


def _metrics_line(metrics: Mapping[str, float]) -> str:
    shown = {k: v for k, v in metrics.items() if not k.endswith("images_per_sec")}
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())) or "none logged"


def train_summary(trainer: L.Trainer, run_dir: Path, metrics: Mapping[str, float], overrides: Sequence[str] = ()) -> str:
    """The end-of-run text of `train.py`: run directory, last / best checkpoint, latest sample grid, final
    metrics, and the commands to continue training, evaluate, and sample with another sampler."""

    ckpts = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    last = next((Path(c.last_model_path) for c in ckpts if c.last_model_path and Path(c.last_model_path).is_file()), None)
    best = [(c.monitor, Path(c.best_model_path)) for c in ckpts if c.monitor and c.best_model_path and Path(c.best_model_path).is_file()]
    grids = [c.last_path for c in trainer.callbacks if isinstance(c, SampleGrid) and c.last_path and Path(c.last_path).is_file()]
    step = trainer.global_step
    lines = [f"Finished at step {step}.", f"  run directory    {run_dir}"]
    lines.append(f"  last checkpoint  {last}" if last else "  last checkpoint  none written (callbacks.checkpoint)")
    lines += [f"  best checkpoint  {path} (by {monitor})" for monitor, path in best]
    if grids:
        lines.append(f"  latest samples   {grids[-1]}")
    lines.append(f"  final metrics    {_metrics_line(metrics)}")
    if last is not None:
        own = _keep(overrides)
        ckpt = f"ckpt_path={last}"
        module = trainer.lightning_module
        is_diffusion = hasattr(module, "sample")
        lines.append("Next:")
        further = command("train.py", *own, ckpt, f"trainer.max_steps={2 * max(step, 1)}")
        decay = module.hparams.get("lr_decay", "constant")
        # a decayed learning rate is stretched over the new length: it rises again from where it ended
        note = f"  # module.lr_decay={decay} then ends at the new max_steps" if decay != "constant" else ""
        lines.append(f"  train further     {further}{note}")
        if is_diffusion:
            lines.append(f"  evaluate (FID)    {command('evaluate.py', ckpt, 'num_samples=10000', 'metrics=[fid,isc,kid]')}")
            other = other_sampler(module.hparams.get("sampler"), module.schedule)
            lines.append(f"  other sampler     {command('evaluate.py', ckpt, *other, 'num_samples=64', 'metrics=[]')}")
    return "\n".join(lines)


def evaluate_next_steps(result: Mapping[str, Any], out: Path, schedule: Any = None) -> list[str]:
    """The follow-up commands printed after `evaluate.py`: more samples (the shards made are reused), another
    sampler, and where the samples are."""
    ckpt = f"ckpt_path={result['checkpoint']['path']}"
    overrides = cli_overrides()
    n = int(result["num_samples"])
    lines = []
    files = [out / name for name in ("samples.npz", "grid.png", "metrics.json") if (out / name).is_file()]
    if files:
        lines.append("  files            " + ", ".join(str(f) for f in files))
    lines.append("Next:")
    more = _keep(overrides, ("ckpt_path", "num_samples"))  # same sampler and output folder: its shards are reused
    lines.append(f"  more samples      {command('evaluate.py', ckpt, *more, f'num_samples={max(2 * n, 1000)}')}")
    other = other_sampler(result.get("sampler_config"), schedule)
    own = _keep(overrides, ("ckpt_path", "num_samples", "sampler", "output_dir"))
    lines.append(f"  other sampler     {command('evaluate.py', ckpt, *other, *own, f'num_samples={n}')}")
    return lines
