"""3x3 convolutions for channels-last CPU images: Winograd's F(4x4, 3x3) in fp32, F(2x2, 3x3) with bf16 matrix
products, and in bf16 a weight gradient that is one matrix product on small images.

fp32: the direct convolution runs at the CPU's FMA peak, so only fewer multiplications make it faster.
Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
Networks") computes each 4x4 output tile from a 6x6 input patch with 36 multiplications per channel pair instead
of 144: 36 matrix products over channels between transforms of the input and output tiles
(`kernels/winograd.cpp`, which runs transform, products and inverse transform chunk by chunk, each chunk's tiles
in cache on one thread). Its rounding error is about 10x the direct convolution's: 1e-5 of the output's largest
value at 128 channels, against 1e-6. Under bf16 autocast it computes in fp32 from the bf16 input: on CPUs without
AMX that can be faster than oneDNN's bf16 convolution.

bf16: oneDNN's bf16 convolution also runs at the CPU's peak (about 450 GFLOP/s on 2 AMD EPYC cores with
avx512_bf16), so again only fewer multiplications help. F(4x4, 3x3) in bf16 is too inexact (its transforms
amplify the bf16 rounding of the tiles to 5e-2 of the output), but F(2x2, 3x3), whose input and output transforms
take only 0 and +-1, computes 2x2 tiles from 4x4 patches with 16 multiplications instead of 36 and, with U, V and
the products M in bf16, is within 1-4x the error of oneDNN's bf16 convolution (the weight gradient's end of that
range: each chunk's bf16 product is rounded to bf16 before it joins the fp32 sum, as torch has no CPU matrix
product with bf16 operands and an fp32 result); its 16 bf16 matrix products run at the same peak.

The bf16 weight gradient: oneDNN's bf16 weight-gradient kernel runs at a fraction of its forward speed when the
image is small (the U-Net's 8x8 and 4x4 levels: 3-5x the forward's time, where a matrix product over the same
numbers takes about one forward). There `Conv2d` computes dL/dW as [O, N H W] @ [N H W, 9 I] over the nine shifted
copies of the zero-padded input (im2col), and dL/dx and dL/db as oneDNN would: the same sums, in another order.

Which route a layer takes for a given input (oneDNN, always a candidate, the Winograd routes, or the
matrix-product weight gradient) is measured on first use, not decided by rules about the CPU: see `cpu.autotune`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune
from .norm import channels_last_cpu

# Winograd: bytes of transformed tiles per chunk (kernels/winograd.cpp), by dtype, as measured fastest on 2 AMD EPYC cores
CHUNK_BYTES = {torch.float32: 2**22, torch.bfloat16: 2**21}
IM2COL_BYTES = 2**28  # the matrix-product weight gradient is a candidate while its [N H W, 9 I] copy fits in this


def weight_grad_3x3(x: Tensor, dy: Tensor) -> Tensor:
    """dL/dW of a 3x3, stride-1, padding-1 convolution of x with output gradient dy: for each tap (i, j), the sum
    over pixels of dy times x shifted by (i - 1, j - 1); returned channels-last, [O, I, 3, 3]."""
    N, I, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N, H + 2, W + 2, I]
    cols = torch.stack([padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3)], 3)  # [N, H, W, 9, I]
    g = dy.permute(0, 2, 3, 1).reshape(N * H * W, -1)
    return (g.t() @ cols.reshape(N * H * W, 9 * I)).view(-1, 3, 3, I).permute(0, 3, 1, 2)


_fixed: list[dict] = []  # within sampling(): (id(weight), m, dtype, rotated) -> (weight, U)
FIXED_BYTES = 2**30  # ... holding at most this many bytes of U (unet_cifar10: 0.57 GB in fp32 F(4x4), 0.13 in bf16)


@contextlib.contextmanager
def sampling() -> Iterator[None]:
    """Within this block each Winograd layer transforms its kernels (U = G g G^T) on its first call and reuses them
    until the block ends: for sampling, whose weights do not change from one network evaluation to the next (at
    batch 8 the transforms are about 5% of a unet_cifar10 evaluation). The weights must not change inside it
    (`accelerate` makes it the network's `sampling_context`, which `DiffusionModule.sample` and bits/dim enter). Transforms beyond FIXED_BYTES are computed at every call."""
    _fixed.append({})
    try:
        yield
    finally:
        _fixed.pop()


def winograd_kernels(weight: Tensor, m: int, dtype: torch.dtype, rotated: bool = False) -> Tensor:
    """U = G g G^T of every kernel as `kernels/winograd.cpp` takes it ([K, I, O] in `dtype`; `rotated`: of the
    kernels turned by 180 degrees, [K, O, I]); inside `sampling`, once per layer parameter."""
    kept = _fixed[-1] if _fixed and isinstance(weight, nn.Parameter) else None
    key = (id(weight), m, dtype, rotated)
    if kept is not None and key in kept and kept[key][0] is weight:
        return kept[key][1]
    U = autotune.kernel("winograd", wait=True).kernels(weight.float().contiguous(memory_format=torch.channels_last), m, rotated, dtype)
    if kept is not None and sum(u.nbytes for _, u in kept.values()) + U.nbytes <= FIXED_BYTES:
        kept[key] = (weight, U)
    return U


class _Winograd(torch.autograd.Function):
    """y = A^T [U V] A + b over m x m output tiles, the transforms computed in fp32 and U, V, M stored in `dtype`
    (the matrix products' operands; y returned in x's dtype). dL/dx is the same convolution of dL/dy with the
    rotated kernels; dL/dU sums dM^T V over the tiles, V recomputed from x rather than kept ((m + 2)^2 / m^2 times
    its size)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, m: int, dtype: torch.dtype) -> Tensor:
        k = autotune.kernel("winograd", wait=True)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.m, ctx.dtype = bias is not None, m, dtype
        b = x.new_empty(0, dtype=torch.float32) if bias is None else bias.float().contiguous()
        return k.conv(x.to(dtype), winograd_kernels(weight, m, dtype), b, m, CHUNK_BYTES[dtype]).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        k, (x, weight), m, dtype = autotune.kernel("winograd", wait=True), ctx.saved_tensors, ctx.m, ctx.dtype
        dy = dy.to(dtype).contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = k.conv(dy, winograd_kernels(weight, m, dtype, rotated=True), dy.new_empty(0, dtype=torch.float32), m, CHUNK_BYTES[dtype]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = k.weight_grad(x.to(dtype), dy, m, CHUNK_BYTES[dtype]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3), dtype=torch.float32)
        return dx, dw, db, None, None


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, m: int = 4, dtype: torch.dtype = torch.float32) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) of a channels-last CPU image by Winograd's F(m x m, 3x3) (Lavin & Gray
    2016, Eq. 8): Y = A^T [U V] A, with the (m + 2)^2 matrix products U V over channels as one torch.bmm in `dtype`.
    F(4x4, 3x3) takes 4x fewer multiplications than the direct convolution, F(2x2, 3x3) 2.25x."""
    return _Winograd.apply(x, weight, bias, m, dtype)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            mask = [True, False, False]
            dx = torch.ops.aten.convolution_backward(dy, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)[0]
        if ctx.needs_input_grad[1]:
            dw = weight_grad_3x3(x, dy)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """oneDNN's convolution, in autocast's dtype where it is on (nn.Conv2d's own forward)."""
    return F.conv2d(x, weight, bias, 1, 1)


def _winograd(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """winograd_conv3x3 F(4x4, 3x3) in fp32 (of a bf16 input as it comes), the output in `dtype`."""
    with torch.autocast("cpu", enabled=False):
        return winograd_conv3x3(x, weight, bias).to(dtype)


def _winograd_bf16(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """winograd_conv3x3 F(2x2, 3x3) with bf16 matrix products, the output in bf16 (`dtype`)."""
    with torch.autocast("cpu", enabled=False):
        return winograd_conv3x3(x.to(dtype), weight, bias, 2, dtype)


def _gemm_weight_grad(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """oneDNN's forward and input gradient, the weight gradient as one matrix product (`_Conv3x3`), in `dtype`."""
    with torch.autocast("cpu", enabled=False):
        return _Conv3x3.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


ROUTES = {"onednn": _onednn, "winograd": _winograd, "winograd_bf16": _winograd_bf16, "gemm_weight_grad": _gemm_weight_grad}


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state dict) that, for 3x3, stride-1, padding-1 convolutions of channels-last
    CPU images, takes the fastest of ROUTES as measured on first use (`cpu.autotune`): oneDNN's convolution,
    `winograd_conv3x3` (channel counts that are multiples of 16; F(4x4) in fp32, and in bf16 also F(2x2) with bf16
    products) and, in training, `_Conv3x3`'s matrix-product weight gradient. Anything else is `nn.Conv2d`."""

    @classmethod
    def like(cls, conv: nn.Conv2d) -> Conv2d:
        """This convolution in place of `conv`, holding the same parameter tensors (no copy)."""
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, conv.bias is not None, conv.padding_mode)
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self._3x3(x):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return ROUTES[self.route(x, dtype)](x, self.weight, self.bias, dtype)

    def route(self, x: Tensor, dtype: torch.dtype) -> str:
        """The route name for this channels-last CPU input and compute dtype (autotune.choose)."""
        train = autotune.training(x, self.weight, self.bias)
        candidates = ["onednn"]
        same = torch.is_autocast_enabled("cpu") or x.dtype == self.weight.dtype  # else F.conv2d's own error
        if same and dtype in (torch.float32, torch.bfloat16) and x.dtype in (torch.float32, torch.bfloat16):
            if self._winograd_fits() and autotune.kernel("winograd") is not None:
                candidates += ["winograd", "winograd_bf16"] if dtype == torch.bfloat16 else ["winograd"]
            if train and x.numel() * 9 * dtype.itemsize <= IM2COL_BYTES:
                candidates.append("gemm_weight_grad")
        key = autotune.layer_key("conv3x3", x, dtype, train, f"{self.in_channels}to{self.out_channels}", f"dx{int(x.requires_grad)}")

        def bench(route: str):
            leaves = autotune.copies(x, self.weight, self.bias)
            return autotune.runner(lambda: ROUTES[route](*leaves, dtype), train, leaves)

        pending = self._winograd_fits() and autotune.building("winograd")
        return autotune.choose(key, candidates, bench, pending=pending)

    def _winograd_fits(self) -> bool:
        return self.weight.dtype in (torch.float32, torch.bfloat16) and self.in_channels % 16 == 0 and self.out_channels % 16 == 0

    def _3x3(self, x: Tensor) -> bool:
        return (
            channels_last_cpu(x)
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        )
