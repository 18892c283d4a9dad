"""GroupNorm (Wu & He 2018, Eq. 1-2) of an optionally shifted input, optionally followed by SiLU and dropout,
with a fused CPU kernel for channels-last tensors.

PyTorch's CPU GroupNorm is several times slower on channels-last tensors than on contiguous ones (about 4x in
bf16 at [16, 128, 32, 32], forward and backward), and channels-last is the layout the convolutions are fastest
in. `kernels/group_norm.cpp` normalises channels-last fp32 / bf16 tensors in two passes forward and three
backward, fusing the SiLU that follows every GroupNorm of a ResBlock, and for the second the time embedding added
to its input and the dropout that follows it (its mask a hash of a seed and the element index, regenerated in the
backward pass rather than stored). It is built with
`torch.utils.cpp_extension` on first use (about 45 s, cached in the torch extensions folder, one build per CPU
instruction set); without a compiler the layer warns once and uses `F.group_norm`. Everything else (GPU tensors,
contiguous tensors, float64) takes `F.group_norm` as well.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KERNELS = Path(__file__).with_name("kernels")
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_kernels: dict = {}  # name -> the loaded extension, or False once its build has failed


def kernel(name: str = "group_norm"):
    """The compiled extension kernels/<name>.cpp, or None where it cannot be built (warned once)."""
    if name not in _kernels:
        from torch.utils.cpp_extension import load

        capability = torch.backends.cpu.get_cpu_capability()
        try:
            _kernels[name] = load(
                f"ddpm_lightning_{name}_{capability.lower()}",
                [str(_KERNELS / f"{name}.cpp")],
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *_FLAGS.get(capability, [])],
                extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in torch's builds; libgomp is torch's own
            )
        except Exception as e:  # no compiler, no headers: the plain path still works
            warnings.warn(f"compiled kernel {name}.cpp unavailable ({type(e).__name__}: {e}); using PyTorch's operators", stacklevel=2)
            _kernels[name] = False
    return _kernels[name] or None


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, groups: int, eps: float, silu: bool, p: float, seed: int) -> Tensor:
        y, mean, rstd, sums = kernel().forward(x, weight, bias, shift, groups, eps, silu, p, seed)
        ctx.save_for_backward(x, weight, bias, shift, mean, rstd, sums)
        ctx.groups, ctx.silu, ctx.p, ctx.seed = groups, silu, p, seed
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, bias, shift, mean, rstd, sums = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx, dweight, dbias, dshift = kernel().backward(dy, x, weight, bias, shift, mean, rstd, sums, ctx.groups, ctx.silu, ctx.p, ctx.seed)
        return dx, dweight, dbias, dshift, None, None, None, None, None


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state dict) with `silu=True` applying SiLU to its output, and the fused
    kernel for channels-last CPU inputs while `self.fused` is true (`UNet(fused_norm=...)`).

    `forward(x, dropout, shift)` normalises x + shift[:, :, None, None] for a [N, C] `shift` (the ResBlock's time
    embedding; the kernel never writes the sum out) and applies a dropout module after it: in training the kernel
    fuses it (same keep probability and scaling, its own mask, keyed by a seed from torch's global generator);
    otherwise it is called on the output."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps)
        self.silu, self.fused = silu, True

    def forward(self, x: Tensor, dropout: nn.Dropout | None = None, shift: Tensor | None = None) -> Tensor:
        p = dropout.p if dropout is not None and dropout.training else 0.0
        if self.fused and _fusable(x) and p < 1 and x.numel() < 2**32 and kernel() is not None:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) if p > 0 else 0
            t = x.new_zeros(x.shape[:2], dtype=torch.float32) if shift is None else shift.float().contiguous()
            return _GroupNormSiLU.apply(x, self.weight.float(), self.bias.float(), t, self.num_groups, self.eps, self.silu, p, seed)
        if shift is not None:
            x = x + shift[:, :, None, None]
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.silu(y) if self.silu else y
        return dropout(y) if dropout is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")


def channels_last_cpu(x: Tensor) -> bool:
    """A 4-D CPU tensor laid out channels-last (and not also contiguous, as 1x1 images are)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _fusable(x: Tensor) -> bool:
    """An fp32 / bf16 channels-last CPU tensor (F.group_norm is fast on contiguous ones)."""
    return channels_last_cpu(x) and x.dtype in (torch.float32, torch.bfloat16)
