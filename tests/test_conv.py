"""The small-image 3x3 convolution's own backward pass against autograd through F.conv2d."""

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.nets import conv
from ddpm_lightning.nets.conv import Conv2d


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


def test_conv2d_takes_the_matrix_product_only_for_small_bf16_channels_last_training(monkeypatch):
    calls = []
    original = conv._Conv3x3.apply
    monkeypatch.setattr(conv._Conv3x3, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    layer = Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    plain.load_state_dict(layer.state_dict())  # the same parameters and state dict as nn.Conv2d
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last)

    def run(m):
        x.grad = None
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.backward(dy.to(y.dtype))
        return [y.float(), x.grad, m.weight.grad, m.bias.grad]

    got, want = run(layer), run(plain)
    assert calls == [1]
    assert got[2].dtype == torch.float32  # gradients reach the fp32 parameters through the autocast-style casts
    for g, w in zip(got, want):  # both bf16: rounding differs, not the sums
        assert ((g.float() - w.float()).abs().max() / w.float().abs().max()) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(4, 16, 16, 16).contiguous(memory_format=torch.channels_last))  # above SMALL_IMAGE
        layer(torch.randn(4, 16, 8, 8))  # not channels-last
        with torch.no_grad():
            layer(x)  # sampling: the forward is the same either way
    layer(x)  # fp32
    assert calls == [1]
