"""EMA against an independent computation of the recursion."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.training.callbacks import EMA


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.layer(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(L.Callback):
    """Raw weights after each optimizer step."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append([p.detach().clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("decay, warmup", [(0.9, False), (0.999, True), (0.5, True)])
def test_ema_equals_the_recursion(decay, warmup, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    ema, record = EMA(decay=decay, warmup=warmup), Record()
    trainer = L.Trainer(
        max_steps=7, callbacks=[record, ema], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))
    # Independent recursion: e_1 = theta_1; e_n = d_n e_{n-1} + (1 - d_n) theta_n,
    # d_n = min(decay, (1 + k) / (10 + k)) with k = n - 1 earlier updates when warming up.
    expected = [p.double() for p in record.history[0]]
    for n, params in enumerate(record.history[1:], start=2):
        k = n - 1
        d = min(decay, (1 + k) / (10 + k)) if warmup else decay
        expected = [d * e + (1 - d) * p.double() for e, p in zip(expected, params)]
    got = list(ema.averaged_module().parameters())
    for e, g in zip(expected, got):
        assert torch.allclose(g.double(), e, atol=1e-6)
    # and it differs from the raw weights
    assert not torch.allclose(got[0], record.history[-1][0])


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        EMA(decay=1.5)
