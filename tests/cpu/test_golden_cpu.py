"""Golden samples of the plug-in: the old tiny checkpoint (tests/data/golden/tiny.ckpt), its network accelerated and
the kernels' routes forced (Winograd convolutions, fused GroupNorm + SiLU + dropout), gives the samples, and the
training forward / backward with dropout, recorded (samples_cpu.pt) before the speed paths moved into the plug-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm_lightning import cpu
from ddpm_lightning.loading import load_model
from ddpm_lightning.cpu import autotune
from ddpm_lightning.nets import UNet

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
SEEDS = [0, 1, 2, 3]
SAMPLERS = {  # as tests/test_golden.py
    "ddim": {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 10, "spacing": "uniform"},
    "dpmpp_2m": {"_target_": "ddpm_lightning.diffusion.samplers.dpmpp_2m", "_partial_": True, "steps": 10},
    "ddpm": {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "steps": 50, "spacing": "uniform"},
}
KERNELS = {"conv3x3": "winograd", "group_norm": "fused"}
STOCK = {"conv3x3": "onednn", "group_norm": "stock"}
TOL = 1e-5  # float32 on another CPU may round differently; a changed computation moves the numbers by far more

pytestmark = pytest.mark.skipif(
    autotune.kernel("winograd", wait=True) is None or autotune.kernel("group_norm", wait=True) is None,
    reason="no C++ compiler for the kernels",
)


def plug_in_samples(ckpt: Path) -> dict[str, torch.Tensor]:
    """The samples of `ckpt` (EMA weights, channels-last, accelerated) for SEEDS under each of SAMPLERS on the
    kernels' routes, and the chain's state before its last step."""
    module = load_model(ckpt)
    cpu.accelerate(module.net).to(memory_format=torch.channels_last)
    out = {}
    with autotune.forcing(**KERNELS), torch.no_grad():
        for name, cfg in SAMPLERS.items():
            states = []
            out[name] = module.sample(SEEDS, sampler=cfg, callback=lambda k, x: states.append(x.clone()))
            out[f"{name}_state"] = states[-2]
    return out


def training_step(ckpt: Path, routes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The accelerated network of `ckpt` with dropout 0.1, in training: its output for a fixed batch and seed and
    two of its gradients (mean squared output), on the given routes."""
    saved = torch.load(ckpt, weights_only=True)
    hp = {k: v for k, v in saved["hyper_parameters"]["net"].items() if k != "_target_"}
    module = load_model(ckpt)
    net = UNet(**{**hp, "dropout": 0.1})
    net.load_state_dict(module.net.state_dict())
    net = cpu.accelerate(net).to(memory_format=torch.channels_last).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (4,), generator=g)
    with autotune.forcing(**routes):
        torch.manual_seed(1)
        y = net(x, t)
        y.square().mean().backward()
    block = net.down[1][0]
    return {"": y.detach(), "_grad_conv1": block.conv1.weight.grad, "_grad_norm2": block.norm2.weight.grad}


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= TOL * max(1.0, want.abs().max()))


def test_the_plug_in_samples_the_old_checkpoint_as_it_did():
    recorded = torch.load(GOLDEN / "samples_cpu.pt", weights_only=True)
    samples = plug_in_samples(GOLDEN / "tiny.ckpt")
    for name, x in samples.items():
        assert x.shape == (len(SEEDS), 1, 8, 8) and close(x, recorded[name]), name
    # the kernels ran: their samples differ from PyTorch's operators' (tests/data/golden/samples.pt) in rounding
    plain = torch.load(GOLDEN / "samples.pt", weights_only=True)
    assert not torch.equal(samples["ddim_state"], plain["ddim_state"])


@pytest.mark.parametrize("route", ["fused", "stock"])
def test_the_plug_in_trains_as_it_did_with_dropout(route):
    """fused: the GroupNorm kernel's own dropout mask; stock: the plug-in's CPU Dropout after F.group_norm."""
    recorded = torch.load(GOLDEN / "samples_cpu.pt", weights_only=True)
    got = training_step(GOLDEN / "tiny.ckpt", KERNELS if route == "fused" else STOCK)
    for suffix, x in got.items():
        assert close(x, recorded[f"train_{route}{suffix}"]), suffix
