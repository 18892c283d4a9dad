"""The plug-in's seam: `accelerate(net)` swaps in state-dict-compatible modules whose outputs are the plain
network's, a network that is not accelerated never reaches the routes or the kernels, and the one switch
(tasks.cpu_plugin, conf `kernels`) turns it on for a run."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from helpers.config import compose_cfg
from ddpm_lightning import cpu
from ddpm_lightning.cpu import autotune as routes
from ddpm_lightning.cpu.blocks import Dropout, FusedResBlock
from ddpm_lightning.cpu.conv import Conv2d
from ddpm_lightning.cpu.norm import GroupNorm
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.losses import eps_mse
from ddpm_lightning.nets import UNet
from ddpm_lightning.nets.classifier import EncoderClassifier
from ddpm_lightning.nets.unet import ResBlock
from ddpm_lightning.diffusion.schedules import linear

CL = torch.channels_last
needs_kernels = pytest.mark.skipif(routes.kernel("winograd", wait=True) is None or routes.kernel("group_norm", wait=True) is None, reason="no C++ compiler for the kernels")
NETS = {  # the model configs' shapes: unet_small, unet_cifar10, a class-conditional one with learned variances
    "unet_small": dict(in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0, image_size=16),
    "unet_cifar10": dict(),
    "conditional_learn_sigma": dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                                    num_classes=10, learn_sigma=True),
}


def small_unet(dropout: float = 0.0) -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=dropout, image_size=8)
    for p in net.parameters():  # the zero-initialised output layers would hide differences
        torch.nn.init.normal_(p, std=0.05)
    return net


def loss_and_grads(net, x0, channels_last=False, bf16=False):
    if channels_last:
        net, x0 = net.to(memory_format=CL), x0.contiguous(memory_format=CL)
    denoiser = Denoiser(net, linear())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = eps_mse(denoiser, x0, generator=torch.Generator().manual_seed(1))[0].mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("name", NETS)
def test_accelerate_keeps_the_state_dict_and_the_parameter_tensors(name):
    """Same keys in the same order, the same tensors (not copies): checkpoints and optimiser states are unchanged."""
    torch.manual_seed(0)
    net = UNet(**NETS[name])
    before = net.state_dict()
    params = dict(net.named_parameters())
    assert cpu.accelerate(net) is net
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert all(p is params[n] for n, p in net.named_parameters())
    assert sum(p.numel() for p in net.parameters()) == (35_746_307 if name == "unet_cifar10" else sum(v.numel() for v in params.values()))
    blocks = [m for m in net.modules() if isinstance(m, (ResBlock, FusedResBlock))]
    assert blocks and all(type(m) is FusedResBlock for m in blocks)
    assert type(net.out[0]) is GroupNorm and all(type(b.conv1) is Conv2d and type(b.dropout) is Dropout for b in blocks)
    assert type(net.down[0][0]) is not Conv2d and type(net.out[2]) is torch.nn.Conv2d  # the speed paths' layers only


def test_an_accelerated_net_loads_a_plain_nets_state_dict_and_the_reverse():
    plain, fast = small_unet(), cpu.accelerate(UNet(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8))
    fast.load_state_dict(plain.state_dict())
    back = UNet(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
    back.load_state_dict(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_accelerated_outputs_equal_the_plain_nets_on_pytorchs_routes_and_within_rounding_on_the_kernels(layout):
    """On PyTorch's routes (oneDNN, F.group_norm) the numbers are the plain network's, bit for bit; on the
    kernels' (Winograd, fused GroupNorm) within float32 rounding."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    plain = small_unet().eval().to(memory_format=fmt)
    fast = cpu.accelerate(copy.deepcopy(plain))
    x, t = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt), torch.tensor([1, 10, 100, 999])
    with torch.no_grad():
        want = plain(x, t)
        with routes.forcing(conv3x3="onednn", group_norm="stock"):
            assert torch.equal(fast(x, t), want)
        if layout == "channels_last" and routes.kernel("winograd", wait=True) and routes.kernel("group_norm", wait=True):
            with routes.forcing(conv3x3="winograd", group_norm="fused"):
                got = fast(x, t)
            assert not torch.equal(got, want) and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())


def test_accelerated_training_steps_equal_the_plain_nets_without_dropout():
    plain, x0 = small_unet(), torch.rand(4, 3, 8, 8) * 2 - 1
    loss, grads = loss_and_grads(copy.deepcopy(plain), x0, channels_last=True)
    with routes.forcing(conv3x3="onednn", group_norm="stock"):
        loss_a, grads_a = loss_and_grads(cpu.accelerate(copy.deepcopy(plain)), x0, channels_last=True)
    assert torch.equal(loss, loss_a) and torch.equal(grads, grads_a)


def test_sampling_an_accelerated_net_runs_in_its_sampling_context(monkeypatch):
    """module.sample and bits/dim enter `net.sampling_context` (Winograd transforms kept while the weights are fixed)."""
    from ddpm_lightning.compose import build

    module = build(compose_cfg(["kernels=auto"]).module)
    entered = []
    original = cpu.sampling

    def counted():
        entered.append(1)
        return original()

    cpu.accelerate(module.net)
    module.net.sampling_context = counted
    module.sample([0, 1], sampler={"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 2})
    assert entered == [1]


def test_a_net_that_is_not_accelerated_never_reaches_the_routes_or_the_kernels(monkeypatch):
    """Plain networks (what every model config builds) train and sample on PyTorch's operators alone."""
    from ddpm_lightning.compose import build

    def touched(*args, **kwargs):
        raise AssertionError("a CPU route or kernel was touched by a network that was not accelerated")

    for name in ("kernel", "choose", "building", "_load", "_start_build"):
        monkeypatch.setattr(routes, name, touched)
    monkeypatch.setitem(routes._settings, "mode", "auto")
    module = build(compose_cfg(["model.dropout=0.1"]).module)
    x0 = (torch.rand(4, 1, 8, 8) * 2 - 1).contiguous(memory_format=CL)
    module.train()
    eps_mse(module.denoiser, x0, generator=torch.Generator().manual_seed(0))[0].mean().backward()
    module.sample([0, 1], sampler={"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 2})
    classifier = EncoderClassifier(10, 1, 32, (1, 2), 1, (4,), 0.1, 8).to(memory_format=CL)
    classifier(x0, torch.zeros(4)).sum().backward()


def test_nothing_above_the_plug_in_imports_it():
    """Importing the package's entry points, the module and evaluation leaves ddpm_lightning.cpu unimported."""
    code = ("import sys, ddpm_lightning.tasks, ddpm_lightning.evaluation, ddpm_lightning.training.module, ddpm_lightning.nets; "
            "print(sorted(m for m in sys.modules if m.startswith('ddpm_lightning.cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_run_setting_kernels_switches_the_plug_in_on_or_off(monkeypatch):
    """conf `kernels` (train.yaml / evaluate.yaml: $DDPM_LIGHTNING_KERNELS, else off) reaches the plug-in through the
    one switch, tasks.cpu_plugin; off: nothing of it runs."""
    from ddpm_lightning.tasks import cpu_plugin, speed_settings

    monkeypatch.setitem(routes._settings, "mode", "off")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = compose_cfg(["kernels=auto"])
    assert "fused_norm" not in cfg.model and "winograd" not in cfg.model  # not a model setting
    assert cpu_plugin(cfg) is cpu and routes.mode() == "auto"
    speed_settings(cfg)
    assert torch.backends.cudnn.benchmark
    assert cpu_plugin(compose_cfg(["kernels=off", "retain_freed_memory=false"])) is None
    monkeypatch.delenv("DDPM_LIGHTNING_KERNELS")
    assert compose_cfg().kernels == "off"  # the default: opt-in
    monkeypatch.setenv("DDPM_LIGHTNING_KERNELS", "auto")
    assert compose_cfg().kernels == "auto"
    with pytest.raises(ValueError, match="kernels='fast'"):
        cpu_plugin(compose_cfg(["kernels=fast"]))


def test_a_run_with_kernels_auto_trains_accelerated_and_records_its_routes(tmp_path):
    """The one switch accelerates the trained network and adds the callback that writes `cpu_routes`; with
    kernels=off the checkpoint holds none (and the network stays plain)."""
    from ddpm_lightning.tasks import train

    run = ["trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "logger=none"]
    train(compose_cfg([*run, "kernels=auto"], tmp_path / "auto"))
    saved = torch.load(tmp_path / "auto" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["cpu_routes"]["mode"] == "auto" and saved["cpu_routes"]["routes"]
    train(compose_cfg([*run, "kernels=off"], tmp_path / "off"))
    assert "cpu_routes" not in torch.load(tmp_path / "off" / "checkpoints" / "last.ckpt", weights_only=True)


def test_evaluate_with_kernels_auto_samples_the_accelerated_network(tiny_run, tmp_path, monkeypatch):
    """evaluate.py's switch accelerates the loaded network; on PyTorch's routes its samples are kernels=off's."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from helpers.config import CONF
    from ddpm_lightning.tasks import evaluate

    accelerated = []
    monkeypatch.setattr(cpu, "accelerate", lambda net, swap=cpu.accelerate: accelerated.append(swap(net)) or net)

    def samples(out, kernels):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[
                f"ckpt_path={tiny_run[1]}", f"output_dir={out}", "sampler=ddim", "sampler.steps=3", "num_samples=4",
                "shard_size=2", "batch_size=2", "metrics=[]", "grid_size=4", "trainer.accelerator=cpu", f"kernels={kernels}"])
        evaluate(cfg)
        return np.load(out / "samples.npz")["arr_0"]

    with routes.forcing(conv3x3="onednn", group_norm="stock"):
        fast = samples(tmp_path / "auto", "auto")
    plain = samples(tmp_path / "off", "off")
    assert len(accelerated) == 1 and any(isinstance(m, FusedResBlock) for m in accelerated[0].modules())
    assert np.array_equal(fast, plain)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_keeps_each_element_with_probability_1_minus_p(p, channels_last):
    drop = Dropout(p)
    x = torch.rand(64, 32, 16, 16) + 1.0  # no zeros of its own
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert torch.allclose(out[kept], x[kept] / (1 - p))  # inverted dropout: kept values scaled by 1 / (1 - p)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    # neighbouring elements are independent (no structure from cutting one random integer into four masks)
    flat = kept.permute(0, 2, 3, 1).flatten() if channels_last else kept.flatten()
    both = (flat[:-1] & flat[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 4 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
    out.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), out.detach())  # the global RNG decides: seeded runs repeat
    assert torch.equal(drop.eval()(x), x)


@needs_kernels
def test_fused_group_norm_gives_the_plain_loss_and_gradients_in_bf16():
    """The fused GroupNorm kernel route (tests/cpu/test_norm.py) against the plain F.group_norm route."""
    net, x0 = small_unet(), torch.rand(4, 3, 8, 8) * 2 - 1
    with routes.forcing(group_norm="stock"):
        loss, grads = loss_and_grads(cpu.accelerate(copy.deepcopy(net)), x0, channels_last=True, bf16=True)
    with routes.forcing(group_norm="fused"):
        loss_f, grads_f = loss_and_grads(cpu.accelerate(copy.deepcopy(net)), x0, channels_last=True, bf16=True)
    assert torch.allclose(loss, loss_f, rtol=1e-2)
    assert torch.nn.functional.cosine_similarity(grads, grads_f, dim=0) > 0.999


@needs_kernels
def test_winograd_convolutions_give_the_direct_loss_and_gradients_in_fp32():
    """The Winograd F(4x4, 3x3) route for the 3x3 convolutions against oneDNN's."""
    torch.manual_seed(0)
    net, x0 = small_unet(), torch.rand(4, 3, 8, 8) * 2 - 1
    with routes.forcing(conv3x3="onednn"):
        loss, grads = loss_and_grads(cpu.accelerate(copy.deepcopy(net)), x0, channels_last=True)
    with routes.forcing(conv3x3="winograd"):
        loss_w, grads_w = loss_and_grads(cpu.accelerate(copy.deepcopy(net)), x0, channels_last=True)
    assert not torch.equal(grads, grads_w)  # the other algorithm ran: other roundings
    assert torch.allclose(loss, loss_w, rtol=1e-5)
    assert torch.allclose(grads, grads_w, rtol=1e-4, atol=1e-6)


_FAULTS = """
import resource, sys, torch
from ddpm_lightning.cpu import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # like a training step's activations: 4 buffers of 48 MiB, written, all freed
        buffers = [torch.ones(48 << 20, dtype=torch.uint8) for _ in range(4)]
        del buffers
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the first allocation faults in either way
print(faults())
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    """5 re-allocations of 4 freed 48 MiB buffers fault their 4 x 12,288 pages in every time with glibc's
    defaults (blocks above its largest automatic mmap threshold, 32 MiB, are always fresh mmaps; smaller ones
    are often trimmed off the heap top), and (almost) never once freed memory is retained."""
    import subprocess
    import sys

    def run(mode):
        return int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout.split()[-1])

    default, retained = run("default"), run("retain")
    assert default > 5 * 4 * 12288 * 0.9, default
    assert retained < 500, retained
