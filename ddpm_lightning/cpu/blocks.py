"""The seam between the plug-in and a built network: `accelerate(net)` puts the CPU speed modules in place of the
plain ones, keeping every parameter tensor (so state dicts, checkpoints and optimiser states are unchanged).

What is swapped is what the U-Net's speed paths cover: each `ResBlock` becomes a `FusedResBlock` (its GroupNorms
with the SiLU, the time-embedding shift and the dropout fused in, its 3x3 convolutions routed, the CPU dropout),
the GroupNorm of every attention block and of the output head, and the convolution of every upsampling block.
Other layers (the input and output convolutions, the classifier's head, ControlNet's condition encoder) stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lightning.nets.unet import AttnBlock, ResBlock, UNet, Upsample

from .conv import Conv2d, sampling
from .norm import GroupNorm


class Dropout(nn.Dropout):
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by
    1 / (1 - p). On CPU the keep mask compares 16-bit uniforms, cut four at a time from 64-bit random integers,
    with p * 2^16: a quarter of the generator calls of `bernoulli_`, about 3x faster (p is rounded to a
    multiple of 2^-16). Elsewhere, or for a tensor that is not densely laid out, it is `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        if not self.training or self.p == 0 or x.device.type != "cpu" or not dense or self.inplace:
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1).view(torch.int16)[:n]
        keep = bits.as_strided(x.shape, x.stride()) >= round(self.p * 2**16) - 2**15
        return x * keep * (1 / (1 - self.p))


class FusedResBlock(nn.Module):
    """The U-Net's `ResBlock` (same submodule names and parameters) computed as the fused kernel wants it: norm2
    adds the projected time embedding to its input and applies the dropout to its output, both GroupNorms apply
    the SiLU, and the convolutions take their measured routes."""

    def __init__(self, block: ResBlock):
        super().__init__()
        self.norm1 = GroupNorm.like(block.norm1, silu=True)
        self.conv1 = Conv2d.like(block.conv1)
        self.temb_proj = block.temb_proj
        self.norm2 = GroupNorm.like(block.norm2, silu=True)
        self.dropout = Dropout(block.dropout.p)
        self.conv2 = Conv2d.like(block.conv2)
        self.skip = block.skip
        self.train(block.training)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h, self.dropout, shift=self.temb_proj(F.silu(temb))))
        return self.skip(x) + h


def accelerate(net: nn.Module) -> nn.Module:
    """Swap the CPU speed modules into `net` in place (see the module docstring) and give it the context its
    samplers run in (`net.sampling_context`: Winograd transforms kept while the weights are fixed); returns `net`.
    Its state dict, parameters and outputs (up to the routes' rounding) are those of the plain network."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ResBlock:
                setattr(parent, name, FusedResBlock(child))
        if isinstance(parent, AttnBlock):
            parent.norm = GroupNorm.like(parent.norm)
        elif isinstance(parent, Upsample):
            parent.conv = Conv2d.like(parent.conv)
        elif isinstance(parent, UNet):
            parent.out[0] = GroupNorm.like(parent.out[0])
    net.sampling_context = sampling
    return net
