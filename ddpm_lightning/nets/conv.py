"""A 3x3 convolution whose weight gradient, on small bf16 channels-last CPU images, is one matrix product.

oneDNN's bf16 weight-gradient kernel runs at a fraction of its forward speed when the image is small (the
U-Net's 8x8 and 4x4 levels: 3-5x the forward's time, where a matrix product over the same numbers takes about
one forward). There `Conv2d` computes dL/dW as [O, N H W] @ [N H W, 9 I] over the nine shifted copies of the
zero-padded input (im2col), and dL/dx and dL/db as oneDNN would: the same sums, in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import channels_last_cpu

SMALL_IMAGE = 64  # pixels (H W) up to which the matrix product is faster (bf16, 2-core AMX CPU, batch 16)


def weight_grad_3x3(x: Tensor, dy: Tensor) -> Tensor:
    """dL/dW of a 3x3, stride-1, padding-1 convolution of x with output gradient dy: for each tap (i, j), the sum
    over pixels of dy times x shifted by (i - 1, j - 1); returned channels-last, [O, I, 3, 3]."""
    N, I, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N, H + 2, W + 2, I]
    cols = torch.stack([padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3)], 3)  # [N, H, W, 9, I]
    g = dy.permute(0, 2, 3, 1).reshape(N * H * W, -1)
    return (g.t() @ cols.reshape(N * H * W, 9 * I)).view(-1, 3, 3, I).permute(0, 3, 1, 2)


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


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state dict) that takes `_Conv3x3`'s backward for 3x3, stride-1, padding-1
    convolutions of bf16 (or bf16-autocast) channels-last CPU images of at most SMALL_IMAGE pixels in training."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if not (self._small_3x3(x) and dtype == torch.bfloat16 and torch.is_grad_enabled()):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _Conv3x3.apply(x.to(dtype), self.weight.to(dtype), bias)

    def _small_3x3(self, x: Tensor) -> bool:
        return (
            channels_last_cpu(x)
            and x.shape[-2] * x.shape[-1] <= SMALL_IMAGE
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        )
