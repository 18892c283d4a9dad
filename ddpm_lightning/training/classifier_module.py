"""The LightningModule of the noise-aware classifier used by classifier guidance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm_lightning import registry
from ddpm_lightning.batch import unpack
from ddpm_lightning.training.module import ImageModule, _plain


class NoisyClassifierModule(ImageModule):
    """Dhariwal & Nichol 2021 §4: trains p_phi(y | x_t, t) with cross-entropy on x_t ~ q(x_t | x_0) (the diffusion
    model's schedule, t uniform), so that its gradient can guide sampling at every noise level."""

    def __init__(self, net: Mapping, schedule: Mapping, optimizer: Mapping, image_size: int, channels: int, warmup_steps: int = 0):
        super().__init__()
        net, schedule, optimizer = (_plain(c) for c in (net, schedule, optimizer))
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps={warmup_steps} must be non-negative")
        self.save_hyperparameters(
            {"net": net, "schedule": schedule, "optimizer": optimizer, "image_size": image_size, "channels": channels, "warmup_steps": warmup_steps}
        )
        self.net = registry.build(net, "net", where="module.net")
        self.schedule = registry.build(schedule, "schedule", where="module.schedule")
        if not hasattr(self.net, "num_classes"):
            raise ValueError("module=classifier needs a classifier network (model=classifier_small), not a U-Net")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits of p_phi(y | x_t, t)."""
        return self.net(x, self.schedule.net_label(t))

    def _step(self, batch: Any, generator: torch.Generator | None = None, t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = unpack(batch)
        x0, y = batch["x"], batch["y"]
        if y is None:
            raise ValueError("module=classifier needs (image, label) batches: use a labelled data module (data=digits)")
        if t is None:
            t = self.schedule.sample_t(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        logits = self(self.schedule.q_sample(x0, t, eps), t)
        return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, acc = self._step(batch)
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        g = torch.Generator(self.device).manual_seed(batch_idx)  # the same x_t at every evaluation
        loss, acc = self._step(batch, g)
        t0 = torch.zeros(unpack(batch)["x"].shape[0], dtype=torch.long, device=self.device)
        _, acc_clean = self._step(batch, g, t0)
        self.log_dict({"val/loss": loss, "val/acc": acc, "val/acc_t1": acc_clean}, prog_bar=True, sync_dist=True)

