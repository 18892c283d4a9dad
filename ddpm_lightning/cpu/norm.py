"""GroupNorm (Wu & He 2018, Eq. 1-2) of an optionally shifted input, optionally followed by SiLU and dropout,
with a fused CPU kernel for channels-last tensors.

PyTorch's CPU GroupNorm is several times slower on channels-last tensors than on contiguous ones (about 4x in
bf16 at [16, 128, 32, 32], forward and backward), and channels-last is the layout the convolutions are fastest
in. `kernels/group_norm.cpp` normalises channels-last fp32 / bf16 tensors in two passes forward and three
backward, fusing the SiLU that follows every GroupNorm of a ResBlock, and for the second the time embedding added
to its input and the dropout that follows it (its mask a hash of a seed and the element index, regenerated in the
backward pass rather than stored). Which of the two runs on a channels-last CPU tensor is measured
(`cpu.autotune`); without a compiler, or with `kernels: off`, it is `F.group_norm`. Everything else (GPU tensors,
contiguous tensors, float64) takes `F.group_norm` as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, groups: int, eps: float, silu: bool, p: float, seed: int) -> Tensor:
        y, mean, rstd, sums = autotune.kernel(wait=True).forward(x, weight, bias, shift, groups, eps, silu, p, seed)
        ctx.save_for_backward(x, weight, bias, shift, mean, rstd, sums)
        ctx.groups, ctx.silu, ctx.p, ctx.seed = groups, silu, p, seed
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, bias, shift, mean, rstd, sums = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx, dweight, dbias, dshift = autotune.kernel(wait=True).backward(dy, x, weight, bias, shift, mean, rstd, sums, ctx.groups, ctx.silu, ctx.p, ctx.seed)
        return dx, dweight, dbias, dshift, None, None, None, None, None


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state dict) with `silu=True` applying SiLU to its output, and, for
    channels-last fp32 / bf16 CPU inputs, the fused kernel where it is measured faster (`cpu.autotune`).

    `forward(x, dropout, shift)` normalises x + shift[:, :, None, None] for a [N, C] `shift` (the ResBlock's time
    embedding; the kernel never writes the sum out) and applies a dropout module after it: in training the kernel
    fuses it (same keep probability and scaling, its own mask, keyed by a seed from torch's global generator);
    otherwise it is called on the output."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps)
        self.silu = silu

    @classmethod
    def like(cls, norm: nn.GroupNorm, silu: bool = False) -> GroupNorm:
        """This GroupNorm in place of `norm`, holding the same parameter tensors (no copy)."""
        with torch.device("meta"):
            new = cls(norm.num_groups, norm.num_channels, norm.eps, silu)
        new.weight, new.bias = norm.weight, norm.bias
        return new.train(norm.training)

    def forward(self, x: Tensor, dropout: nn.Dropout | None = None, shift: Tensor | None = None) -> Tensor:
        route = self.route(x, dropout, shift) if _fusable(x) else "stock"
        return ROUTES[route](self, x, self.weight, self.bias, dropout, shift)

    def route(self, x: Tensor, dropout: nn.Dropout | None, shift: Tensor | None) -> str:
        """"stock" or "fused" for this channels-last CPU input (autotune.choose)."""
        p = dropout.p if dropout is not None and dropout.training else 0.0
        candidates = ["stock"] + (["fused"] if p < 1 and x.numel() < 2**32 and autotune.kernel("group_norm") is not None else [])
        train = autotune.training(x, self.weight, self.bias, shift)
        key = autotune.layer_key("group_norm", x, x.dtype, train, f"g{self.num_groups}", f"silu{int(self.silu)}", f"p{p:g}", f"shift{int(shift is not None)}")

        def bench(route: str):
            leaves = autotune.copies(x, self.weight, self.bias, shift)
            return autotune.runner(lambda: ROUTES[route](self, leaves[0], leaves[1], leaves[2], dropout, leaves[3]), train, leaves)

        return autotune.choose(key, candidates, bench, pending=autotune.building("group_norm"))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")


def _stock(m: GroupNorm, x: Tensor, weight: Tensor, bias: Tensor, dropout: nn.Dropout | None, shift: Tensor | None) -> Tensor:
    """F.group_norm of x + shift, SiLU, dropout: PyTorch's operators."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, m.num_groups, weight, bias, m.eps)
    y = F.silu(y) if m.silu else y
    return dropout(y) if dropout is not None else y


def _fused(m: GroupNorm, x: Tensor, weight: Tensor, bias: Tensor, dropout: nn.Dropout | None, shift: Tensor | None) -> Tensor:
    """The same in one kernel (kernels/group_norm.cpp), the dropout mask from a seed drawn from torch's generator."""
    p = dropout.p if dropout is not None and dropout.training else 0.0
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) if p > 0 else 0
    t = x.new_zeros(x.shape[:2], dtype=torch.float32) if shift is None else shift.float().contiguous()
    return _GroupNormSiLU.apply(x, weight.float(), bias.float(), t, m.num_groups, m.eps, m.silu, p, seed)


ROUTES = {"stock": _stock, "fused": _fused}


def channels_last_cpu(x: Tensor) -> bool:
    """A 4-D CPU tensor laid out channels-last (and not also contiguous, as 1x1 images are)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _fusable(x: Tensor) -> bool:
    """An fp32 / bf16 channels-last CPU tensor (F.group_norm is fast on contiguous ones)."""
    return channels_last_cpu(x) and x.dtype in (torch.float32, torch.bfloat16)
