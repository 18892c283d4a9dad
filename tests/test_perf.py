"""Speed options never change the maths: optimised and plain paths give the same loss and samples."""

import copy

import pytest
import torch

from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.losses import eps_mse
from ddpm_lightning.diffusion.samplers import PerSampleNoise, ddim
from ddpm_lightning.diffusion.schedules import linear
from ddpm_lightning.nets import UNet


def small_unet():
    torch.manual_seed(0)
    net = UNet(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, image_size=8)
    for p in net.parameters():  # the zero-initialised output layers would hide differences
        torch.nn.init.normal_(p, std=0.05)
    return net


def loss_and_grads(net, x0, channels_last=False, bf16=False):
    if channels_last:
        net, x0 = net.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
    denoiser = Denoiser(net, linear())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = eps_mse(denoiser, x0, generator=torch.Generator().manual_seed(1))[0].mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


def test_channels_last_gives_the_same_loss_and_gradients():
    net, x0 = small_unet(), torch.rand(4, 3, 8, 8) * 2 - 1
    loss, grads = loss_and_grads(copy.deepcopy(net), x0)
    loss_cl, grads_cl = loss_and_grads(copy.deepcopy(net), x0, channels_last=True)
    assert torch.allclose(loss, loss_cl, rtol=1e-5)
    assert torch.allclose(grads, grads_cl, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_loss_within_bf16_tolerance():
    net, x0 = small_unet(), torch.rand(4, 3, 8, 8) * 2 - 1
    loss, grads = loss_and_grads(copy.deepcopy(net), x0)
    loss_bf, grads_bf = loss_and_grads(copy.deepcopy(net), x0, bf16=True)
    # bf16 keeps 8 bits of mantissa: relative error of order 2^-8 per op, a few per cent overall
    assert torch.allclose(loss, loss_bf, rtol=3e-2)
    assert torch.nn.functional.cosine_similarity(grads, grads_bf, dim=0) > 0.99


def test_channels_last_sampling_matches():
    net = small_unet().eval()
    schedule = linear()

    def run(n):
        noise = PerSampleNoise([0, 1], "cpu")
        return ddim(Denoiser(n, schedule), noise.randn((3, 8, 8)), noise, steps=5)

    plain = run(net)
    fast = run(copy.deepcopy(net).to(memory_format=torch.channels_last))
    assert torch.allclose(plain, fast, atol=1e-4)


def test_benchmark_peers_have_our_architecture():
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    # diffusers' UNet2DModel in google/ddpm-cifar10-32's configuration: the same 35,746,307 parameters
    assert common.count(common.diffusers_unet("unet_cifar10", 32, 3)) == common.count(common.ours("unet_cifar10", 32, 3)) == 35_746_307



@pytest.mark.parametrize("fast", ["foreach", "fused"])
def test_multi_tensor_adam_takes_the_same_steps_as_plain_adam(fast):
    # conf/module/diffusion.yaml uses fused Adam: the same update (Kingma & Ba 2015 Algorithm 1), batched
    torch.manual_seed(0)
    start = [torch.randn(1000) for _ in range(3)]
    grads = [[torch.randn(1000) * 10.0**-k for k in range(3)] for _ in range(4)]  # gradient scales 1 to 1e-2
    out = {}
    for name, kw in (("plain", {"foreach": False}), (fast, {fast: True})):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4, **kw)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        out[name] = torch.cat([p.detach() for p in params])
    moved = (out["plain"] - torch.cat(start)).abs()
    assert moved.median() > 1e-2  # a learning rate or more per parameter
    assert torch.allclose(out["plain"], out[fast], atol=1e-6)


def test_optimizer_state_takes_the_parameter_layout_before_fused_steps():
    # a checkpoint of a contiguous run resumed with module.channels_last=true: fused Adam steps in memory order
    import copy as copy_

    from ddpm_lightning.training.module import match_state_layout

    torch.manual_seed(0)
    start, grads = torch.randn(8, 3, 3, 3), [torch.randn(8, 3, 3, 3) for _ in range(6)]

    def run(fused, channels_last, match):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.Adam([p], lr=0.1, **({"fused": True} if fused else {"foreach": False}))
        for g in grads[:3]:
            p.grad = g.clone()
            opt.step()
        saved = copy_.deepcopy(opt.state_dict())  # contiguous state
        if channels_last:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.Adam([p], lr=0.1, **({"fused": True} if fused else {"foreach": False}))
            opt.load_state_dict(saved)
        if match:
            match_state_layout(opt)
        for g in grads[3:]:
            p.grad = g.contiguous(memory_format=torch.channels_last) if channels_last else g.clone()
            opt.step()
        return p.detach().contiguous()

    plain = run(fused=False, channels_last=False, match=False)
    assert torch.allclose(run(fused=True, channels_last=True, match=True), plain, atol=1e-6)
    assert not torch.allclose(run(fused=True, channels_last=True, match=False), plain, atol=1e-3)  # what it prevents


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adam_trains_with_gradient_clipping(precision, tmp_path):
    # conf/module/diffusion.yaml's fused Adam with trainer.gradient_clip_val: the step sees clipped gradients
    import lightning as L

    from helpers.config import compose_cfg
    from ddpm_lightning.compose import build

    cfg = compose_cfg([], tmp_path)
    assert cfg.module.optimizer.fused
    module, data = build(cfg.module), build(cfg.data)
    clip, norms = 1e-3, {}

    def total_norm(params):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.setdefault("before", []).append(total_norm(pl_module.parameters()))

        def on_train_batch_end(self, trainer, pl_module, *_):  # after the step: the gradients it used
            norms.setdefault("at_step", []).append(total_norm(pl_module.parameters()))

    trainer = L.Trainer(max_steps=2, precision=precision, gradient_clip_val=clip, callbacks=[Record()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(norms["at_step"]) == 2
    assert min(norms["before"]) > 10 * clip  # clipping had something to do
    assert max(norms["at_step"]) == pytest.approx(clip, rel=1e-3)


def test_training_start_re_lays_out_restored_optimizer_states(monkeypatch):
    # ImageModule.on_train_start runs match_state_layout on every optimiser of the trainer
    from types import SimpleNamespace

    import ddpm_lightning.training.module
    from ddpm_lightning.training.module import ImageModule

    monkeypatch.setattr(ddpm_lightning.training.module, "correct_epoch_after_resume", lambda trainer: None)  # no fit loop here

    p = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.Adam([p], fused=True)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(4, 3, 3, 3), "exp_avg_sq": torch.rand(4, 3, 3, 3)}
    before = {k: v.clone() for k, v in opt.state[p].items()}
    module = ImageModule()
    module._trainer = SimpleNamespace(optimizers=[opt])
    module.on_train_start()
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k].stride() == p.stride() and torch.equal(opt.state[p][k], before[k])


