"""Routes chosen by measurement (ddpm_lightning.cpu.autotune): every route computes the same convolution and
GroupNorm, decisions follow the cache file, bad cache files are replaced, and the U-Net trains without the
kernels and never touches them on other devices."""

import json
import time

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.cpu import accelerate, conv, norm
from ddpm_lightning.cpu import autotune as routes
from ddpm_lightning.cpu.blocks import Dropout
from ddpm_lightning.cpu.conv import Conv2d
from ddpm_lightning.cpu.norm import GroupNorm
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.losses import eps_mse
from ddpm_lightning.diffusion.schedules import linear
from ddpm_lightning.nets import UNet

CL = torch.channels_last
needs_kernels = pytest.mark.skipif(routes.kernel("winograd", wait=True) is None or routes.kernel("group_norm", wait=True) is None, reason="no C++ compiler for the kernels")


def relative_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@needs_kernels
@pytest.mark.parametrize("route, bf16", [(r, bf16) for r in conv.ROUTES for bf16 in (False, True) if bf16 or r != "winograd_bf16"])
def test_every_convolution_route_gives_conv2ds_output_and_gradients(route, bf16):
    """Forced route, fp32 or bf16 autocast, against F.conv2d in float64 (tolerances of tests/test_conv.py: 3e-5 of
    the largest entry in fp32, 2e-2 in bf16)."""
    torch.manual_seed(0)
    layer = Conv2d(32, 16, 3, padding=1).to(memory_format=CL)
    x = torch.randn(3, 32, 8, 8).contiguous(memory_format=CL).requires_grad_()
    dy = torch.randn(3, 16, 8, 8).contiguous(memory_format=CL)
    with routes.forcing(conv3x3=route), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert layer.route(x, torch.bfloat16 if bf16 else torch.float32) == route
        y = layer(x)
    y.backward(dy.to(y.dtype))
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32) and y.is_contiguous(memory_format=CL)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    want = F.conv2d(x64, w64, b64, 1, 1)
    want.backward(dy.double())
    errors = relative_errors([y, x.grad, layer.weight.grad, layer.bias.grad], [want, x64.grad, w64.grad, b64.grad])
    assert layer.weight.grad.dtype == torch.float32
    assert max(errors) < (2e-2 if bf16 else 3e-5), errors


@needs_kernels
@pytest.mark.parametrize("route", list(norm.ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_group_norm_route_gives_the_formulas_output_and_gradients(route, dtype):
    """GroupNorm of x + shift, SiLU: forced route against F.group_norm in float64 (tolerances of tests/test_norm.py;
    2e-2 for bf16 parameter gradients, which the stock route reduces from bf16 products)."""
    torch.manual_seed(0)
    layer = GroupNorm(8, 64, silu=True)
    torch.nn.init.normal_(layer.weight, 1, 0.5), torch.nn.init.normal_(layer.bias, 0, 0.5)
    x = (torch.randn(4, 64, 6, 5) * 0.5 + 2).to(dtype).contiguous(memory_format=CL).requires_grad_()
    t = torch.randn(4, 64).to(dtype).requires_grad_()
    dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=CL)
    with routes.forcing(group_norm=route):
        assert layer.route(x, None, t) == route
        y = layer(x, shift=t)
    y.backward(dy)
    x64, t64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, t, layer.weight, layer.bias))
    want = F.silu(F.group_norm(x64 + t64[:, :, None, None], 8, w64, b64, layer.eps))
    want.backward(dy.double())
    errors = relative_errors([y, x.grad, t.grad, layer.weight.grad, layer.bias.grad], [want, x64.grad, t64.grad, w64.grad, b64.grad])
    assert y.dtype == dtype
    assert max(errors) < (2e-2 if dtype == torch.bfloat16 else 1e-5), errors


def train_call(layer, x):
    y = layer(x)
    y.float().square().sum().backward()
    return y.detach()


def test_route_decisions_are_measured_once_and_then_follow_the_cache_file(cache, monkeypatch):
    torch.manual_seed(0)
    layer = Conv2d(16, 16, 3, padding=1).to(memory_format=CL)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL).requires_grad_()
    train_call(layer, x)  # measures its candidates and writes the file
    key, = routes.decisions()
    assert key.startswith("conv3x3|16to16|") and "|train|" in key
    data = json.loads(cache.read_text())
    assert data["machine"] == routes.machine() and set(data["routes"][key]["ms"]) >= {"onednn", "gemm_weight_grad"}
    assert data["routes"][key]["route"] == routes.decisions()[key]

    # another process with this file: no timing, the file's route (here edited to one it would not pick itself)
    def no_timing(bench):
        raise AssertionError("a decision in the cache file was measured again")

    monkeypatch.setattr(routes, "time_routes", no_timing)
    for route in ("gemm_weight_grad", "onednn"):
        data["routes"][key]["route"] = route
        cache.write_text(json.dumps(data))
        routes.reset()
        taken = []
        monkeypatch.setitem(conv.ROUTES, route, lambda *a, f=conv.ROUTES[route]: taken.append(route) or f(*a))
        first, again = train_call(layer, x), train_call(layer, x)
        assert taken == [route, route] and routes.decisions() == {key: route}
        assert torch.equal(first, again)


@needs_kernels
@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "machine": {"cpu": "another CPU"}, "routes": {}}), "[]"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_notice_and_rebuilt(cache, content):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content)
    layer = GroupNorm(4, 16, silu=True)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    with pytest.warns(UserWarning, match="ignoring the route cache"):
        layer(x)
    data = json.loads(cache.read_text())  # written afresh: this machine's, with the new decision
    assert data["machine"] == routes.machine() and list(data["routes"]) == list(routes.decisions())


def test_a_speed_path_is_taken_only_when_clearly_faster_than_pytorchs_operator():
    pick = routes.pick
    assert pick({"onednn": [1.0] * 5, "winograd": [0.97] * 5}, "onednn") == "onednn"  # within the noise margin
    assert pick({"onednn": [1.0] * 5, "winograd": [1.0] * 5}, "onednn") == "onednn"  # ties go to PyTorch's operator
    assert pick({"onednn": [1.0] * 5, "winograd": [0.8] * 5, "gemm_weight_grad": [0.9] * 5}, "onednn") == "winograd"
    # a lower median from rounds that lost to the default in most pairs (a burst of load mid-measurement): no
    assert pick({"onednn": [0.1, 0.1, 1.0, 1.0, 1.0], "winograd": [0.2, 0.2, 0.5, 0.5, 2.0]}, "onednn") == "onednn"
    times = routes.time_routes({"a": lambda: torch.randn(3), "b": lambda: None})
    assert set(times) == {"a", "b"} and all(len(t) == routes.ROUNDS and min(t) >= 0 for t in times.values())
    calls = []  # the first WARMUP calls (slow here, as first calls in a process can be) are made but not timed

    def slow_at_first():
        calls.append(1)
        time.sleep(0.03 if len(calls) <= routes.WARMUP else 0)

    times = routes.time_routes({"a": slow_at_first})
    assert len(calls) == routes.WARMUP + routes.ROUNDS and max(times["a"]) < 0.02


@needs_kernels
def test_timing_leaves_the_global_random_state_alone(cache):
    """Measuring a dropout route on first use must not shift the seeded run's random numbers."""

    layer, drop = GroupNorm(4, 16, silu=True).train(), Dropout(0.5).train()
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    torch.manual_seed(3)
    layer(x, drop)  # measured here
    after_first = torch.randn(4)
    torch.manual_seed(3)
    with routes.forcing(group_norm=routes.decisions()[next(iter(routes.decisions()))]):
        layer(x, drop)
    assert torch.equal(torch.randn(4), after_first)


def test_a_pending_build_takes_pytorchs_operator_without_deciding(cache, monkeypatch):
    monkeypatch.setattr(routes, "building", lambda name: True)
    layer = Conv2d(16, 16, 3, padding=1).to(memory_format=CL)
    assert layer.route(torch.randn(2, 16, 8, 8).contiguous(memory_format=CL), torch.float32) == "onednn"
    assert list(routes.decisions().values()) == ["onednn"]  # taken (a checkpoint records it), not decided:
    assert not cache.exists() and routes._decisions == {}  # measured once the kernel is built


def small_unet():
    torch.manual_seed(0)
    net = UNet(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, image_size=8)
    return accelerate(net).to(memory_format=CL)


def test_without_a_compiler_the_unet_trains_on_pytorchs_operators(cache, monkeypatch):
    monkeypatch.setattr(routes, "_kernels", {})
    monkeypatch.setattr(routes.shutil, "which", lambda name: None)
    monkeypatch.setattr(routes, "_load", lambda name: pytest.fail("tried to build a kernel without a compiler"))
    net = small_unet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x0 = (torch.rand(8, 3, 8, 8) * 2 - 1).contiguous(memory_format=CL)
    losses = []
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler") as notices:
        for _ in range(8):
            loss = eps_mse(Denoiser(net, linear()), x0, generator=torch.Generator().manual_seed(0))[0].mean()
            loss.backward()
            opt.step(), opt.zero_grad()
            losses.append(loss.item())
    assert len(notices) == 2  # one line per kernel, not one per call
    assert losses[-1] < 0.8 * losses[0]  # it learns: same batch, same noise
    assert all(v in ("onednn", "stock", "gemm_weight_grad") for v in routes.decisions().values())


def test_kernels_off_takes_pytorchs_operators_and_builds_nothing(monkeypatch):
    monkeypatch.setattr(routes, "_kernels", {})
    monkeypatch.setattr(routes, "_start_build", lambda name: pytest.fail("built a kernel with kernels=off"))
    monkeypatch.setitem(routes._settings, "mode", "off")
    taken = []
    monkeypatch.setitem(conv.ROUTES, "onednn", lambda *a, f=conv.ROUTES["onednn"]: taken.append(1) or f(*a))
    net = small_unet()
    net(torch.randn(2, 3, 8, 8).contiguous(memory_format=CL), torch.zeros(2)).sum().backward()
    assert taken and routes.kernel("winograd") is None
    with pytest.raises(ValueError, match="kernels='fast' must be one of auto, off"):
        routes.configure("fast")


def test_on_another_device_the_cpu_routes_and_kernels_are_never_touched(monkeypatch):
    """A CUDA model takes nn.Conv2d / F.group_norm; the 'meta' device stands in for it here."""
    def touched(*args, **kwargs):
        raise AssertionError("a CPU route or kernel was touched for a non-CPU tensor")

    for name in ("kernel", "choose", "building", "_load"):
        monkeypatch.setattr(routes, name, touched)
    net = small_unet().to("meta")
    x = torch.randn(2, 3, 8, 8, device="meta").contiguous(memory_format=CL)
    y = net(x, torch.zeros(2, device="meta"))
    y.sum().backward()
    assert y.shape == x.shape and y.device.type == "meta"


def test_the_build_folder_is_named_by_the_kernel_source_and_its_checkout(tmp_path, monkeypatch):
    name = routes._extension_name("winograd")
    assert routes.source_hash("winograd") in name and name.startswith("ddpm_lightning_winograd_")
    source = (routes._KERNELS / "winograd.cpp").read_text()
    for i, text in enumerate([source, source + "\n// changed\n"]):  # another checkout: the same source, or another
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "winograd.cpp").write_text(text)
        monkeypatch.setattr(routes, "_KERNELS", tmp_path / str(i))
        assert routes._extension_name("winograd") != name


def test_old_kernel_switches_in_a_model_config_are_accepted():
    """Checkpoints from before `kernels` hold model.fused_norm / model.winograd: they still build the same U-Net."""
    UNet(ch=32, ch_mult=(1,), attn_resolutions=(), image_size=8, fused_norm=True, winograd=True)
    with pytest.warns(UserWarning, match="kernels=off"):
        UNet(ch=32, ch_mult=(1,), attn_resolutions=(), image_size=8, winograd=False)


def test_a_resumed_run_takes_the_routes_in_its_checkpoint_not_the_cache_files(cache, monkeypatch):
    torch.manual_seed(0)
    layer = Conv2d(16, 16, 3, padding=1).to(memory_format=CL)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL).requires_grad_()
    train_call(layer, x)
    saved = routes.state()  # what RoutesCallback.on_save_checkpoint stores
    key, = saved["routes"]
    assert saved["mode"] == "auto"
    data = json.loads(cache.read_text())
    other = next(r for r in data["routes"][key]["ms"] if r != saved["routes"][key])
    data["routes"][key]["route"] = other  # another process's file disagrees with the checkpoint
    cache.write_text(json.dumps(data))

    def no_timing(bench):
        raise AssertionError("a route of the resumed run was measured again")

    monkeypatch.setattr(routes, "time_routes", no_timing)
    routes.reset()
    routes.restore(saved)
    train_call(layer, x)
    assert routes.decisions() == saved["routes"]
    routes.reset()  # the control: without the checkpoint's routes, the file's
    train_call(layer, x)
    assert routes.decisions() == {key: other}


def test_a_run_trained_with_kernels_off_resumes_with_them_off(monkeypatch):
    monkeypatch.setitem(routes._settings, "mode", "auto")
    routes.restore({"mode": "off", "routes": {}})
    assert routes.mode() == "off"
    routes.restore({"mode": "auto", "routes": {}})  # a run measured with them on keeps this process's setting
    assert routes.mode() == "off"


def test_kernels_build_at_the_lowest_cpu_priority(tmp_path):
    """The background build must not take cores from the run that started it (the quickstart on 2 cores)."""
    log = tmp_path / "build.log"
    assert routes.background("import os; print(os.nice(0))", log).wait(timeout=60) == 0
    assert log.read_text().strip() == "19"


@pytest.mark.parametrize("spare", [True, False])
def test_a_kernel_builds_beside_the_run_on_a_spare_core_else_after_a_while_or_when_it_ends(spare, monkeypatch):
    started, at_exit, now = [], [], [0.0]
    monkeypatch.setattr(routes, "_kernels", {})
    monkeypatch.setattr(routes, "_builds", {})
    monkeypatch.setattr(routes, "_deferred", {})
    monkeypatch.setitem(routes._settings, "mode", "auto")
    monkeypatch.setitem(routes._settings, "wait", False)  # as in a run (the tests build before first use)
    monkeypatch.setattr(routes, "_built", lambda name: False)
    monkeypatch.setattr(routes, "spare_core", lambda: spare)
    monkeypatch.setattr(routes, "_start_build", lambda name: started.append(name) or FakeBuild())
    monkeypatch.setattr(routes.atexit, "register", lambda f, *args: at_exit.append((f, args)))
    monkeypatch.setattr(routes.time, "monotonic", lambda: now[0])
    for _ in range(3):  # every layer asks; one build, or one deferral
        assert routes.kernel("winograd", wait=False) is None and routes.building("winograd")
    assert started == (["winograd"] if spare else []) and len(at_exit) == (0 if spare else 1)
    with monkeypatch.context() as m:  # the per-call answer while waiting looks for neither compiler nor build folder
        m.setattr(routes, "_built", lambda name: pytest.fail("looked for the build folder on every call"))
        m.setattr(routes.shutil, "which", lambda name: pytest.fail("looked for the compiler on every call"))
        assert routes.kernel("winograd", wait=False) is None
    if not spare:
        now[0] = routes.DEFER_S - 1
        assert routes.kernel("winograd", wait=False) is None and started == []
        now[0] = routes.DEFER_S  # a long run: it builds now
        assert routes.kernel("winograd", wait=False) is None and started == ["winograd"] and routes.building("winograd")
        routes.kernel("group_norm", wait=False)  # a short run: put off, then built when the run ends
        f, args = at_exit[0]
        f(*args)
        assert started == ["winograd", "group_norm"] and not routes._deferred


class FakeBuild:
    def poll(self):
        return None  # still building


def test_a_spare_core_means_more_cores_than_torchs_threads(monkeypatch):
    monkeypatch.setattr(routes.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(routes.torch, "get_num_threads", lambda: 2)
    assert not routes.spare_core()
    monkeypatch.setattr(routes.torch, "get_num_threads", lambda: 1)
    assert routes.spare_core()
