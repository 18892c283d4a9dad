"""3x3 convolutions for channels-last CPU images: Winograd's F(4x4, 3x3) in fp32, and in bf16 a weight gradient that
is one matrix product on small images.

fp32: the direct convolution runs at the CPU's FMA peak, so only fewer multiplications make it faster.
Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
Networks") computes each 4x4 output tile from a 6x6 input patch with 36 multiplications per channel pair instead
of 144: 36 matrix products over channels between transforms of the input and output tiles
(`kernels/winograd.cpp`). Its rounding error is about 10x the direct convolution's: 1e-5 of the output's largest
value at 128 channels, against 1e-6. Under bf16 autocast it is taken (in fp32) on CPUs without AMX, where it is
faster than oneDNN's bf16 convolution.

bf16: oneDNN's bf16 weight-gradient kernel runs at a fraction of its forward speed when the image is small (the
U-Net's 8x8 and 4x4 levels: 3-5x the forward's time, where a matrix product over the same numbers takes about
one forward). There `Conv2d` computes dL/dW as [O, N H W] @ [N H W, 9 I] over the nine shifted copies of the
zero-padded input (im2col), and dL/dx and dL/db as oneDNN would: the same sums, in another order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import channels_last_cpu, kernel

WINOGRAD_IMAGE = 64  # pixels (H W) from which F(4x4, 3x3) is faster (fp32, 2-core AVX-512 CPU, batch 16: 1.6x at 8x8, 0.9x at 4x4)
SMALL_IMAGE = 64  # pixels (H W) up to which the matrix product is faster (bf16, 2-core AMX CPU, batch 16)


def weight_grad_3x3(x: Tensor, dy: Tensor) -> Tensor:
    """dL/dW of a 3x3, stride-1, padding-1 convolution of x with output gradient dy: for each tap (i, j), the sum
    over pixels of dy times x shifted by (i - 1, j - 1); returned channels-last, [O, I, 3, 3]."""
    N, I, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N, H + 2, W + 2, I]
    cols = torch.stack([padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3)], 3)  # [N, H, W, 9, I]
    g = dy.permute(0, 2, 3, 1).reshape(N * H * W, -1)
    return (g.t() @ cols.reshape(N * H * W, 9 * I)).view(-1, 3, 3, I).permute(0, 3, 1, 2)


# Winograd F(4x4, 3x3) weight transform (Lavin & Gray 2016, Sec. 4.2): interpolation points 0, 1, -1, 2, -2, inf
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def winograd_weight(weight: Tensor) -> Tensor:
    """U = G g G^T for every (output, input) channel pair, [O, I, 3, 3] -> [36, I, O] (Lavin & Gray 2016, Eq. 8)."""
    O, I = weight.shape[:2]
    return (_GG(weight) @ weight.reshape(O * I, 9).t()).view(36, O, I).transpose(1, 2)


def winograd_weight_adjoint(dU: Tensor) -> Tensor:
    """dL/dg = G^T dU G, the adjoint of winograd_weight: [36, I, O] -> [O, I, 3, 3]."""
    _, I, O = dU.shape
    return (_GG(dU).t() @ dU.transpose(1, 2).reshape(36, O * I)).t().reshape(O, I, 3, 3)


def _GG(like: Tensor) -> Tensor:
    """G ⊗ G as a [36, 9] matrix: U[a b] = sum_kl G[a k] g[k l] G[b l]."""
    G = like.new_tensor(_G)
    return (G[:, None, :, None] * G[None, :, None, :]).reshape(36, 9)


class _Winograd(torch.autograd.Function):
    """y = A^T [U V] A + b over 4x4 output tiles, in fp32 (a bf16 x is kept as it came, y returned in its dtype);
    the backward pass recomputes U and V from the weight and x rather than keeping them (they are 4x and 2.25x the
    size), and runs the same transforms' adjoints."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        k, (N, _, H, W) = kernel("winograd"), x.shape
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        V = k.input_transform(x.float())
        return k.output_transform(torch.bmm(V, winograd_weight(weight)), x.new_empty(0, dtype=torch.float32) if bias is None else bias.contiguous(), N, H, W).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        k, (x, weight) = kernel("winograd"), ctx.saved_tensors
        N, _, H, W = x.shape
        dy = dy.float().contiguous(memory_format=torch.channels_last)
        dM = k.output_adjoint(dy)  # [36, P, O]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = k.input_adjoint(torch.bmm(dM, winograd_weight(weight).transpose(1, 2)), N, H, W).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = winograd_weight_adjoint(torch.bmm(k.input_transform(x.float()).transpose(1, 2), dM))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) of a channels-last fp32 CPU image by Winograd's F(4x4, 3x3) (Lavin &
    Gray 2016, Eq. 8): Y = A^T [U V] A, with the 36 matrix products U V over channels as one torch.bmm. It takes 4x
    fewer multiplications than the direct convolution."""
    return _Winograd.apply(x, weight, bias)


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


@functools.cache
def amx() -> bool:
    """Whether the CPU has AMX tile units (bf16 matrix products at about 3x the fp32 rate). Without them oneDNN's
    bf16 convolution runs no faster than its fp32 one (0.3 TFLOP/s each on 2 AVX-512 cores with avx512_bf16), so
    fp32 Winograd, with a quarter of the multiplications, is faster than either; Conv2d takes it under bf16
    autocast there (1.9x the training step's speed on that CPU)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)()


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state dict) that, for 3x3, stride-1, padding-1 convolutions of channels-last
    CPU images, takes `winograd_conv3x3` in fp32 (images of at least WINOGRAD_IMAGE pixels, channel counts that are
    multiples of 16, while `self.winograd` is true: `UNet(winograd=...)`; also under bf16 autocast on CPUs without
    AMX, returning bf16), and `_Conv3x3`'s backward in bf16 (or bf16 autocast) on images of at most SMALL_IMAGE
    pixels in training."""

    winograd = True

    def forward(self, x: Tensor) -> Tensor:
        if not self._3x3(x):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if (dtype == torch.float32 or (dtype == torch.bfloat16 and not amx())) and self._winograd_fits(x):
            with torch.autocast("cpu", enabled=False):
                return winograd_conv3x3(x, self.weight, self.bias).to(dtype)
        if not (x.shape[-2] * x.shape[-1] <= SMALL_IMAGE and dtype == torch.bfloat16 and torch.is_grad_enabled()):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _Conv3x3.apply(x.to(dtype), self.weight.to(dtype), bias)

    def _winograd_fits(self, x: Tensor) -> bool:
        return (
            self.winograd
            and x.dtype in (torch.float32, torch.bfloat16)
            and self.weight.dtype == torch.float32
            and x.shape[-2] * x.shape[-1] >= WINOGRAD_IMAGE
            and self.in_channels % 16 == 0
            and self.out_channels % 16 == 0
            and kernel("winograd") is not None
        )

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
