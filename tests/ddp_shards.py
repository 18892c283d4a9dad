"""Run under 2-process CPU DDP by test_data.py: `python tests/ddp_shards.py OUT CIFAR_ROOT`. Trains a
no-op model for 2 epochs on a fabricated CIFAR-10 whose image k is constant k, and writes the example
ids each rank saw per epoch to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from ddpm_lightning.data import CIFAR10DataModule
from ddpm_lightning.tasks import process_group_closed_at_end


class RecordIds(L.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.out, self.w, self.seen = out, torch.nn.Parameter(torch.zeros(())), {}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        ids = ((x.flatten(1)[:, 0] + 1) * 127.5).round().long().tolist()
        self.seen.setdefault(str(self.current_epoch), []).extend(ids)
        return self.w * x.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


if __name__ == "__main__":
    out, root = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0)
    dm = CIFAR10DataModule(root=root, download=False, batch_size=4, num_workers=0, random_flip=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with process_group_closed_at_end():  # a gloo group left to interpreter shutdown can abort the process
        trainer.fit(RecordIds(out), datamodule=dm)
