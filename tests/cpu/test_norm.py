"""The fused channels-last GroupNorm(+SiLU) kernel against F.group_norm in float64."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.cpu import autotune as routes
from ddpm_lightning.cpu import norm
from ddpm_lightning.cpu.blocks import Dropout
from ddpm_lightning.cpu.norm import GroupNorm

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


def fused():
    """The kernel route, wherever it is a candidate (channels-last fp32 / bf16 CPU tensors)."""
    return routes.forcing(group_norm="fused")


def reference(x, layer, dy):
    """Output and (dx, dweight, dbias) of the plain formula in float64."""
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (layer.weight, layer.bias))
    y = F.group_norm(x64, layer.num_groups, w64, b64, layer.eps)
    y = F.silu(y) if layer.silu else y
    y.backward(dy.double())
    return y, x64.grad, w64.grad, b64.grad


def relative_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, groups", [((4, 64, 8, 8), 32), ((1, 96, 5, 3), 32), ((3, 32, 1, 2), 8)])
@pytest.mark.parametrize("silu", [True, False])
def test_fused_group_norm_matches_the_formula_forward_and_backward(dtype, shape, groups, silu):
    assert routes.kernel(wait=True) is not None, "the kernel failed to build where a compiler is present"
    torch.manual_seed(0)
    layer = GroupNorm(groups, shape[1], silu=silu)
    torch.nn.init.normal_(layer.weight, 1, 0.5), torch.nn.init.normal_(layer.bias, 0, 0.5)
    # an offset mean 4x the spread: the variance must not cancel away
    x = (torch.randn(shape) * 0.5 + 2 + torch.randn(shape[1])[:, None, None]).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    assert norm._fusable(x) or shape[2] * shape[3] == 1
    with fused():
        y = layer(x)
    y.backward(dy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.dtype == dtype and x.grad.is_contiguous(memory_format=torch.channels_last)
    got = [y, x.grad, layer.weight.grad, layer.bias.grad]
    want = reference(x, layer, dy)
    # bf16 rounds inputs and outputs to 8 mantissa bits; the statistics and parameter gradients stay fp32
    tol = [1e-2, 2e-2, 1e-4, 1e-4] if dtype == torch.bfloat16 else [1e-5] * 4
    assert all(e < t for e, t in zip(relative_errors(got, want), tol)), relative_errors(got, want)


@needs_compiler
def test_fused_group_norm_runs_the_kernel_only_on_channels_last_cpu_tensors(monkeypatch):
    calls = []
    original = norm._GroupNormSiLU.apply
    monkeypatch.setattr(norm._GroupNormSiLU, "apply", lambda *a: calls.append(1) or original(*a))
    layer = GroupNorm(8, 16, silu=True)
    x = torch.randn(2, 16, 4, 4)
    with fused():
        layer(x)
        GroupNorm(8, 16).double()(x.double().contiguous(memory_format=torch.channels_last))
        assert calls == []
        layer(x.contiguous(memory_format=torch.channels_last))
        assert calls == [1]
    with routes.forcing(group_norm="stock"):
        layer(x.contiguous(memory_format=torch.channels_last))
    assert calls == [1]


def test_group_norm_keeps_nn_group_norm_state_dict_and_falls_back_without_a_compiler(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(routes, "_kernels", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setitem(routes._settings, "wait", True)  # built here (and failing), not in a background process
    layer = GroupNorm(4, 8, silu=True)
    plain = torch.nn.GroupNorm(4, 8)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="group_norm.cpp unavailable"):
        y = layer(x)
    assert torch.equal(y, F.silu(plain(x)))
    assert routes.kernel() is None  # one failed build, not one per call


@needs_compiler
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_keeps_elements_with_probability_1_minus_p_and_its_gradient_uses_the_same_mask(p):
    """GroupNorm + SiLU + dropout in one kernel: against the plain GroupNorm + SiLU (float64) times the mask."""
    torch.manual_seed(0)
    layer, drop = GroupNorm(32, 128, silu=True), Dropout(p)
    torch.nn.init.normal_(layer.weight, 1, 0.5), torch.nn.init.normal_(layer.bias, 0, 0.5)
    x = torch.randn(16, 128, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    with fused():
        y = layer(x, drop)
    y.backward(dy)
    plain, *_ = reference(x, layer, dy)
    kept = y != 0
    n = x.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # kept values scaled by 1 / (1 - p); the dropped ones are not the plain output's own zeros
    assert relative_errors([y[kept]], [plain[kept] / (1 - p)])[0] < 1e-5
    assert (plain[~kept].abs() > 0).all()
    # neighbours in memory (channels, then pixels) are independent
    flat = kept.permute(0, 2, 3, 1).flatten()
    both = (flat[:-1] & flat[1:]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 4 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
    # the backward pass regenerates the same mask: gradients of the plain formula with dy masked and scaled
    want = reference(x, layer, dy * kept / (1 - p))
    assert all(e < 1e-5 for e in relative_errors([x.grad, layer.weight.grad, layer.bias.grad], want[1:]))
    # the global generator decides (seeded runs repeat); a second call draws another mask
    torch.manual_seed(1)
    with fused():
        again = layer(x.detach(), drop)
        assert torch.equal(again, y.detach())
        assert not torch.equal(layer(x.detach(), drop) != 0, kept)
        assert torch.equal(layer(x.detach(), drop.eval()), layer(x.detach()))  # eval: no dropout


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
def test_fused_group_norm_of_a_shifted_input_matches_the_formula(dtype, silu):
    """forward(x, shift=t) normalises x + t[:, :, None, None] without writing it out; gradients reach t too."""
    torch.manual_seed(0)
    layer = GroupNorm(8, 64, silu=silu)
    torch.nn.init.normal_(layer.weight, 1, 0.5), torch.nn.init.normal_(layer.bias, 0, 0.5)
    x = (torch.randn(4, 64, 6, 5) * 0.5 + 2).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    t = (torch.randn(4, 64) * 3).to(dtype).requires_grad_()  # a shift larger than the spread: it moves the statistics
    dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    with fused():
        y = layer(x, shift=t)
    y.backward(dy)
    assert t.grad.dtype == dtype
    x64, t64 = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (layer.weight, layer.bias))
    want = F.group_norm(x64 + t64[:, :, None, None], 8, w64, b64, layer.eps)
    want = F.silu(want) if silu else want
    want.backward(dy.double())
    errors = relative_errors([y, x.grad, t.grad, layer.weight.grad, layer.bias.grad], [want, x64.grad, t64.grad, w64.grad, b64.grad])
    tol = [1e-2, 2e-2, 2e-2, 1e-4, 1e-4] if dtype == torch.bfloat16 else [1e-5] * 5
    assert all(e < tol_ for e, tol_ in zip(errors, tol)), errors
    with routes.forcing(group_norm="stock"):  # the plain path adds the shift itself
        assert relative_errors([layer(x, shift=t)], [want])[0] < tol[0]
