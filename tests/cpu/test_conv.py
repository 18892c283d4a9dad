"""The 3x3 convolutions of cpu.conv against autograd through F.conv2d: Winograd F(4x4, 3x3) and F(2x2, 3x3) in fp32,
F(2x2, 3x3) with bf16 matrix products, and the small-image bf16 weight gradient."""

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.cpu import autotune as routes
from ddpm_lightning.cpu import conv
from ddpm_lightning.cpu.conv import Conv2d

needs_compiler = pytest.mark.skipif(routes.kernel("winograd", wait=True) is None, reason="no C++ compiler for the kernel")


def grads(f, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    f(x, w, b).backward(dy)
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("shape", [(3, 8, 4, 4), (2, 5, 3, 7), (4, 16, 8, 8)])
def test_weight_gradient_by_matrix_product_equals_autograd_in_float64(shape):
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=cl)
    w = torch.randn(6, shape[1], 3, 3, dtype=torch.float64).contiguous(memory_format=cl)
    b = torch.randn(6, dtype=torch.float64)
    dy = torch.randn(shape[0], 6, *shape[2:], dtype=torch.float64).contiguous(memory_format=cl)
    got = grads(conv._Conv3x3.apply, x, w, b, dy)
    want = grads(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x, w, b, dy)
    for g, v in zip(got, want):
        assert torch.allclose(g, v, rtol=1e-12, atol=1e-12)
    assert got[1].is_contiguous(memory_format=cl)


def candidates_of(layer, x, monkeypatch):
    """The routes Conv2d offers routes.choose for input x (under the caller's autocast and grad mode)."""
    seen = []
    monkeypatch.setattr(routes, "choose", lambda key, candidates, bench, pending=False: seen.append(candidates) or "onednn")
    layer(x)
    monkeypatch.undo()
    return seen[0] if seen else None


def test_conv2d_offers_the_matrix_product_weight_gradient_only_in_training(monkeypatch):
    layer = Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    plain.load_state_dict(layer.state_dict())  # the same parameters and state dict as nn.Conv2d
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert candidates_of(layer, x, monkeypatch) == ["onednn", "gemm_weight_grad"]
        with torch.no_grad():
            assert candidates_of(layer, x, monkeypatch) == ["onednn"]  # sampling: the forward is the same either way
    assert candidates_of(layer, torch.randn(4, 16, 8, 8), monkeypatch) is None  # not channels-last: nn.Conv2d
    assert candidates_of(Conv2d(16, 8, 3, padding=1, stride=2), x, monkeypatch) is None
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))


@needs_compiler
@pytest.mark.parametrize("m", [4, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, i, o, h, w", [(2, 16, 32, 8, 8), (3, 32, 16, 5, 7), (1, 16, 16, 1, 3), (2, 48, 16, 13, 4)])
def test_winograd_convolution_matches_float64_forward_and_backward(n, i, o, h, w, bias, m):
    """Whole and partial m x m tiles, one-pixel rows, input and output channels unequal: y, dx, dw, db within fp32
    rounding of the exact convolution (relative to each tensor's largest entry)."""
    x, weight, b, dy = conv_problem(n, i, o, h, w, bias)
    got = run(lambda x, w, b: conv.winograd_conv3x3(x, w, b, m), x, weight, b, dy)
    want = run(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x.double(), weight.double(), None if b is None else b.double(), dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    for g, v in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == v.shape
        assert (g.double() - v).abs().max() / v.abs().max() < 3e-5


@needs_compiler
@pytest.mark.parametrize("n, i, o, h, w", [(2, 16, 32, 8, 8), (3, 32, 16, 5, 7), (1, 16, 16, 1, 3), (2, 48, 16, 13, 4), (4, 128, 128, 16, 16)])
def test_winograd_with_bf16_products_is_as_close_to_the_exact_convolution_as_onednns_bf16_one(n, i, o, h, w):
    """F(2x2, 3x3) with bf16 operands (its transforms take 0 and +-1 only): y, dx, dw, db of a bf16 input and fp32
    parameters within 4x the error of oneDNN's bf16 convolution of the same (measured: y 1.0-1.4x, dx 1.0-2.5x,
    rounded at U, V and M; dw 1.6-3.3x, each chunk's product dM^T V also rounded before the fp32 sum), and below
    1e-2 of each tensor's largest entry."""
    x, weight, b, dy = conv_problem(n, i, o, h, w, True)
    x, dy = x.bfloat16(), dy.bfloat16()
    got = run(lambda x, w, b: conv.winograd_conv3x3(x, w, b, 2, torch.bfloat16), x, weight, b, dy)
    onednn = run(lambda x, w, b: F.conv2d(x, w.bfloat16(), b.bfloat16(), 1, 1), x, weight, b, dy)
    want = run(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x.double(), weight.double(), b.double(), dy)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    for g, d, v in zip(got, onednn, want):
        error, reference = [((t.double() - v).abs().max() / v.abs().max()).item() for t in (g, d)]
        assert error < max(4 * reference, 1e-3) and error < 1e-2, (error, reference)


def conv_problem(n, i, o, h, w, bias):
    """x, weight (unit-variance outputs), bias or None, and an output gradient; x and dy channels-last."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(n, i, h, w).contiguous(memory_format=cl)
    weight, b = torch.randn(o, i, 3, 3) / (3 * i**0.5), torch.randn(o) if bias else None
    return x, weight, b, torch.randn(n, o, h, w).contiguous(memory_format=cl)


def run(f, x, weight, b, dy):
    """[y, dx, dweight, dbias] of f(x, weight, b) (no dbias without a bias), on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, b) if t is not None]
    y = f(*leaves, *([None] * (b is None)))
    y.backward(dy.to(y.dtype))
    return [y, *(t.grad for t in leaves)]


@needs_compiler
def test_winograd_kernel_refuses_channel_counts_it_does_not_block():
    with pytest.raises(RuntimeError, match="multiple of 16 channels, not 20"):
        conv.winograd_conv3x3(torch.randn(1, 20, 8, 8).contiguous(memory_format=torch.channels_last), torch.randn(16, 20, 3, 3), None)


@needs_compiler
def test_conv2d_offers_winograd_for_channel_counts_it_blocks_and_bf16_products_in_bf16(monkeypatch):
    cl = torch.channels_last
    layer = Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=cl)
    with torch.no_grad():
        assert candidates_of(layer, x, monkeypatch) == ["onednn", "winograd"]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 F(4x4) of the bf16 input, F(2x2) in bf16
            assert candidates_of(layer, x, monkeypatch) == ["onednn", "winograd", "winograd_bf16"]
        assert candidates_of(Conv2d(16, 32, 3, padding=1).bfloat16(), x.bfloat16(), monkeypatch) == ["onednn", "winograd", "winograd_bf16"]
        assert candidates_of(layer, torch.randn(2, 16, 1, 3).contiguous(memory_format=cl), monkeypatch) == ["onednn", "winograd"]
        assert candidates_of(Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 8, 8).contiguous(memory_format=cl), monkeypatch) == ["onednn"]
        assert candidates_of(layer.double(), x.double(), monkeypatch) == ["onednn"]
    with routes.forcing(conv3x3="winograd"), torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16().requires_grad_()
        y = layer.float()(xb)  # the output in autocast's bf16
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32


@needs_compiler
@pytest.mark.parametrize("m, dtype", [(4, torch.float32), (2, torch.bfloat16)])
def test_sampling_transforms_each_kernel_once_and_forgets_them_at_its_end(m, dtype):
    """Inside `sampling` a layer's U is computed on its first call and reused (the same tensor, the same
    outputs and input gradients as without the block, as the likelihood's vector-Jacobian products take them);
    after the block a changed weight is transformed afresh."""
    layer = Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).to(dtype)
    with torch.no_grad():
        outside = conv.winograd_conv3x3(x, layer.weight, layer.bias, m, dtype)
        with conv.sampling():
            first = conv.winograd_kernels(layer.weight, m, dtype)
            assert conv.winograd_kernels(layer.weight, m, dtype) is first
            assert conv.winograd_kernels(layer.weight.detach().clone(), m, dtype) is not first  # not a layer's parameter
            torch.testing.assert_close(conv.winograd_conv3x3(x, layer.weight, layer.bias, m, dtype), outside, rtol=0, atol=0)
        assert conv.winograd_kernels(layer.weight, m, dtype) is not first

    def input_gradient():
        xg = x.detach().requires_grad_()
        conv.winograd_conv3x3(xg, layer.weight, layer.bias, m, dtype).float().square().sum().backward()
        return xg.grad

    with conv.sampling():
        inside = [input_gradient() for _ in range(2)]
    for g in inside:
        torch.testing.assert_close(g, input_gradient(), rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.mul_(2)
        twice = conv.winograd_conv3x3(x, layer.weight, layer.bias, m, dtype) - layer.bias.to(dtype)[:, None, None]
    torch.testing.assert_close(twice.float(), 2 * (outside - layer.bias.to(dtype)[:, None, None]).float(), rtol=2e-2, atol=2e-2)
