"""The route decisions in a checkpoint: a resumed run takes the routes the interrupted one took."""

from __future__ import annotations

from typing import Any

import lightning as L

from . import autotune


class RoutesCallback(L.Callback):
    """Writes the routes taken so far (`autotune.state()`) into every checkpoint as `cpu_routes`, and on resume
    takes them again (`autotune.restore`): the routes differ in rounding, so only the same routes continue the run
    as it would have gone on."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["cpu_routes"] = autotune.state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "cpu_routes" in checkpoint:
            autotune.restore(checkpoint["cpu_routes"])
