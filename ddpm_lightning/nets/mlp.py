"""A small MLP eps-network for points [B, dim] (the toy data), with the U-Net's sinusoidal time embedding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lightning.nets.unet import timestep_embedding


class MLPBlock(nn.Module):
    """h + W2 SiLU(W1 SiLU(h) + W_t temb): a residual block with the time embedding added inside."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.temb_proj, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(h)) + self.temb_proj(temb)))


class MLP(nn.Module):
    """eps_theta(x_t, t) for x_t [B, dim]: a linear input layer, `depth` residual blocks of width `hidden` that
    each receive the time embedding (Vaswani et al. sinusoids as in the DDPM U-Net, then a 2-layer MLP), and a
    zero-initialised linear output."""

    num_classes = None

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        for key, value in (("model.dim", dim), ("model.hidden", hidden), ("model.depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        self.dim, self.hidden = dim, hidden
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP built for [B, {self.dim}] inputs (model.dim, from data.data_shape) got {tuple(x.shape)}")
        if y is not None:
            raise ValueError("class labels given to the MLP, which has no class conditioning")
        temb = self.temb(timestep_embedding(t.expand(x.shape[0]), self.hidden))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(h))
