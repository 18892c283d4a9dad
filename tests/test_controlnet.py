"""ControlNet (Zhang et al. 2023): the zero-initialised control branch leaves the base model exactly as it is until
trained, only the branch trains, conditioning_scale 0 is the base, checkpoints load and resume, every sampler and
classifier-free guidance take the condition unchanged, and bad input stops before training or sampling."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers.config import TINY, compose_cfg
from helpers.promptly import promptly
from ddpm_lightning import registry
from ddpm_lightning.control.conditions import Edges, LowRes, Mask, load_folder
from ddpm_lightning.control.module import ControlNetModule, split_hints
from ddpm_lightning.diffusion.guidance import ClassifierFree
from ddpm_lightning.images import to_model_range
from ddpm_lightning.training.module import DiffusionModule
from ddpm_lightning.nets.controlnet import ControlledUNet
from ddpm_lightning.compose import build
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import train

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = {
    "_target_": "ddpm_lightning.nets.UNet", "in_channels": 1, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
    "attn_resolutions": [4], "dropout": 0.0, "image_size": 8,
}
CONDITIONS = {
    "lowres": {"_target_": "ddpm_lightning.control.conditions.LowRes", "factor": 2},
    "edges": {"_target_": "ddpm_lightning.control.conditions.Edges"},
    "mask": {"_target_": "ddpm_lightning.control.conditions.Mask"},
}
CN = ["experiment=controlnet_digits", "logger=none", "callbacks.samples.num_samples=4", "callbacks.samples.every_n_steps=2",
      "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2", "sampler.steps=5"]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def random_base(net: ControlledUNet, seed: int = 0) -> dict:
    """Load random (non-zero: the U-Net's zero-initialised layers would make the base output 0) base weights."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in net.base.state_dict().items()}
    net.load_base(state)
    return state


def built(condition: str = "lowres", **unet) -> ControlledUNet:
    """A ControlledUNet as a stored config builds it: base network and condition built first (ddpm_lightning.registry)."""
    node = {"_target_": "ddpm_lightning.nets.controlnet.ControlledUNet", "base": {**UNET, **unet}, "condition": CONDITIONS[condition]}
    return registry.build(node, "net")


def controlled(condition: str = "lowres", **unet) -> ControlledUNet:
    net = built(condition, **unet)
    random_base(net)
    return net.eval()


def perturb_control(net: ControlledUNet, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.control.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)


# --- the network ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_at_initialisation_the_controlled_output_is_the_base_output_for_any_condition(condition):
    net = controlled(condition, num_classes=3)
    x, t = inputs()
    y = torch.tensor([0, 2, 3])
    base = net.base(x, t, y)
    assert base.abs().max() > 0.1  # a base that outputs something
    real = net.condition(x.clamp(-1, 1), torch.Generator().manual_seed(0))
    for hint in (real, 50 * torch.randn(3, *net.hint_shape), torch.zeros(3, *net.hint_shape)):
        assert torch.equal(net(x, t, y, hint=hint), base)
    # the copy starts from the base's weights
    assert all(torch.equal(a, b) for a, b in zip(net.control.down.parameters(), net.base.down.parameters()))


def test_conditioning_scale_zero_is_the_base_exactly_and_the_scale_sets_the_strength():
    net = controlled()
    perturb_control(net)
    x, t = inputs()
    hint = net.condition(x.clamp(-1, 1))
    base = net.base(x, t)
    assert torch.equal(net(x, t, hint=hint, conditioning_scale=0.0), base)
    outs = {s: net(x, t, hint=hint, conditioning_scale=s) for s in (0.5, 1.0, 2.0)}
    gaps = {s: (o - base).abs().mean().item() for s, o in outs.items()}
    assert 0 < gaps[0.5] < gaps[1.0] < gaps[2.0]
    residuals = net.control(x, t, hint)
    assert torch.allclose(outs[0.5], net.base(x, t, control=[0.5 * r for r in residuals]), atol=1e-6)
    assert not torch.allclose(net(x, t, hint=-hint), outs[1.0])  # the output depends on the condition


def test_the_base_stays_locked_in_eval_mode_and_parameter_counts():
    net = built("mask", dropout=0.1).train()
    assert not net.base.training and all(not m.training for m in net.base.modules())
    assert net.control.training and all(not p.requires_grad for p in net.base.parameters())
    counts = net.parameter_counts()
    encoder = sum(p.numel() for m in (net.base.temb, net.base.down, net.base.mid) for p in m.parameters())
    extra = sum(p.numel() for m in (net.control.hint_encoder, net.control.zero_convs) for p in m.parameters())
    assert counts["control"] == encoder + extra and counts["base"] == sum(p.numel() for p in net.base.parameters())
    assert len(net.control.zero_convs) == len(net.base.skip_channels) + 1


def test_a_bad_condition_is_refused_naming_the_expected_shape():
    net = controlled("mask")
    x, t = inputs(2)
    with pytest.raises(ValueError, match="needs a condition"):
        net(x, t)
    with pytest.raises(ValueError, match=r"expects \[2, 2, 8, 8\]"):
        net(x, t, hint=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expects \[2, 2, 8, 8\]"):
        net(x, t, hint=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="another architecture"):
        net.load_base({k: v for k, v in net.base.state_dict().items() if "mid" not in k})


def test_condition_operators():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    low = LowRes(2)
    hint = low(x)
    assert torch.equal(hint[..., ::2, ::2], torch.nn.functional.avg_pool2d(x, 2)) and torch.equal(hint[..., 1::2, 1::2], hint[..., ::2, ::2])
    assert torch.equal(low.adherence(x, hint), torch.zeros(6)) and (low.adherence(-x, hint) > 0).all()
    edges = Edges()
    e = edges(x)
    assert e.shape == (6, 1, 8, 8) and e.min() >= -1 and e.max() <= 1
    assert torch.equal(edges.adherence(x, e), torch.zeros(6)) and torch.allclose(edges(torch.zeros(1, 1, 8, 8)), -torch.ones(1, 1, 8, 8), atol=1e-2)  # flat: no edge
    assert Edges("canny")(x).shape == (6, 1, 8, 8)
    mask = Mask(0.25, 0.5)
    m = mask(x, torch.Generator().manual_seed(0))
    keep = m[:, -1:] > 0
    holes = (~keep).flatten(1).sum(1)
    assert m.shape == (6, 2, 8, 8) and ((holes >= 2 * 2) & (holes <= 4 * 4)).all()
    assert torch.equal(m[:, :1], x * keep) and torch.equal(mask.adherence(x, m), torch.zeros(6))
    assert torch.equal(mask(x, torch.Generator().manual_seed(0)), m)  # masks follow the generator
    with pytest.raises(ValueError, match="control.factor"):
        LowRes(1)
    with pytest.raises(ValueError, match="control.kind"):
        Edges("laplace")


def test_classifier_free_guidance_takes_the_condition_unchanged():
    """eps~ = (1 + w) eps(x, c, hint) - w eps(x, null, hint): the hint is doubled with the batch."""
    from ddpm_lightning.diffusion.denoiser import Denoiser
    from ddpm_lightning.diffusion.schedules import linear

    net = controlled(num_classes=3)
    perturb_control(net)
    denoiser = Denoiser(net, linear(T=1000))
    x, t = inputs()
    y, hint = torch.tensor([0, 1, 2]), net.condition(x.clamp(-1, 1))
    guided = ClassifierFree(denoiser, w=2.0).eps(x, t, y=y, hint=hint, conditioning_scale=0.7)
    cond = denoiser.eps(x, t, y=y, hint=hint, conditioning_scale=0.7)
    uncond = denoiser.eps(x, t, y=torch.full_like(y, 3), hint=hint, conditioning_scale=0.7)
    assert torch.allclose(guided, 3 * cond - 2 * uncond, atol=1e-5)


SAMPLERS = {
    "ddpm": {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True},
    "ddim": {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 3},
    "ald": {"_target_": "ddpm_lightning.diffusion.samplers.ald", "_partial_": True, "n_steps_each": 1, "levels": 3},
    "pc": {"_target_": "ddpm_lightning.diffusion.samplers.pc", "_partial_": True, "steps": 3},
    "ode": {"_target_": "ddpm_lightning.diffusion.samplers.ode", "_partial_": True, "method": "euler", "steps": 3},
}


@pytest.mark.parametrize("condition", list(CONDITIONS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_under_every_condition_and_scale_zero_samples_the_base(sampler, condition):
    """Samplers pass the condition through **cond to the network; at conditioning_scale 0 the samples are the base
    model's, bitwise."""
    schedule = {"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 8}
    common = {"schedule": schedule, "sampler": SAMPLERS[sampler], "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True}, "image_size": 8, "channels": 1}
    ctrl = DiffusionModule(net={"_target_": "ddpm_lightning.nets.controlnet.ControlledUNet", "_recursive_": False, "base": UNET, "condition": CONDITIONS[condition]}, **common)
    state = random_base(ctrl.net)
    perturb_control(ctrl.net)
    base = DiffusionModule(net=UNET, **common)
    base.net.load_state_dict(state)
    seeds = [0, 1]
    hint = split_hints(ctrl, inputs(2)[0].clamp(-1, 1), seeds)
    expected = base.sample(seeds)
    assert torch.equal(ctrl.sample(seeds, hint=hint, conditioning_scale=0.0), expected)
    controlled_samples = ctrl.sample(seeds, hint=hint)
    assert torch.isfinite(controlled_samples).all() and not torch.equal(controlled_samples, expected)


# --- training on a base checkpoint --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base")
    train(compose_cfg(["logger=none", "callbacks.samples.every_n_steps=0"], root))
    return root / "checkpoints" / "last.ckpt"


def base_net_state(ckpt) -> dict:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def test_one_optimiser_step_moves_the_zero_convolutions_and_only_the_branch_is_optimised(base):
    module: ControlNetModule = build(compose_cfg(CN + [f"base_ckpt={base}"]).module)
    opt = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.control.parameters()}
    zero = [p for m in (module.net.control.zero_convs, module.net.control.hint_encoder[-1]) for p in m.parameters()]
    assert all(torch.count_nonzero(p) == 0 for p in zero)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    module.train()
    module._loss((x, torch.zeros(8, dtype=torch.long)))[0]["loss"].mean().backward()
    assert all(p.grad is None for p in module.net.base.parameters())
    for conv in module.net.control.zero_convs:
        assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0
    opt.step()
    assert all(torch.count_nonzero(conv.weight) > 0 for conv in module.net.control.zero_convs)


def test_the_ema_averages_only_the_trainable_branch(base):
    from torch.optim.swa_utils import AveragedModel

    from ddpm_lightning.training.callbacks import EMA

    module = build(compose_cfg(CN + [f"base_ckpt={base}"]).module)
    ema = EMA(decay=0.9)
    ema._average_model = AveragedModel(module, use_buffers=True)
    averaged = ema._average_model.module
    trainable = ema._trainable()
    assert {p.data_ptr() for p in averaged.net.control.parameters()} <= trainable
    assert not {p.data_ptr() for p in averaged.net.base.parameters()} & trainable


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """A short experiment=controlnet_digits run (4 steps, all checkpoints kept) on the base checkpoint."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("controlnet")
    digest = sha(base)
    train(compose_cfg(CN + [f"base_ckpt={base}", "callbacks.checkpoint.save_top_k=-1", "logger=csv"], root))
    assert sha(base) == digest  # the base checkpoint is read, never written
    return root


def test_controlnet_digits_trains_writes_condition_sample_grids_and_loads_in_one_call(base, run):
    grid = Image.open(run / "samples" / "step_0000004.png")
    assert grid.size == (2 + 8 * (8 * 4 + 2), 2 + (8 * 4 + 2))  # 4 pairs condition | sample in a row, 4x enlarged
    logged = [r for r in csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")) if r.get("samples/nfe")]
    assert [(int(r["step"]), float(r["samples/nfe"])) for r in logged] == [(2, 10.0), (4, 10.0)]  # the grid sampler, DPM++(2M) 10
    model = load_model(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, ControlledUNet) and isinstance(model.net.condition, LowRes)
    assert model.net.base_sha256 == sha(base)
    hint = split_hints(model, torch.zeros(2, 1, 8, 8), [0, 1])
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 3}
    images = model.sample([0, 1], sampler=sampler, hint=hint)
    assert images.shape == (2, 1, 8, 8) and torch.allclose(model.sample([1], sampler=sampler, hint=hint[1:]), images[1:], atol=1e-5)


def test_controlnet_digits_trains_without_lightnings_logging_interval_or_locked_base_warnings(base, tmp_path):
    """At the experiment's batch size the digits make 12 batches an epoch (Lightning warned that log_every_n_steps,
    50 by default, is more), and the locked base is in eval mode on purpose (Lightning warned "Found N module(s) in
    eval mode"): neither is shown, while the same message with another count, or from elsewhere, still is."""
    tiny = [o for o in TINY if not o.startswith(("trainer.log_every_n_steps=", "data.batch_size="))]
    cfg = compose_cfg(tiny + CN + [f"base_ckpt={base}", "logger=csv", "trainer.max_steps=2"], tmp_path, tiny=False)
    assert cfg.data.batch_size == 128 and cfg.trainer.log_every_n_steps < 12
    eval_mode = " module(s) in eval mode at the start of training. This may lead to unexpected behavior during training."
    fit_loop = "lightning.pytorch.loops.fit_loop"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
        shown = [str(w.message) for w in caught]
        assert not [m for m in shown if "logging interval" in m or "in eval mode" in m], shown
        locked = sum(1 for _ in load_model(tmp_path / "checkpoints" / "last.ckpt").net.base.modules())
        for count, module in ((locked + 1, fit_loop), (locked - 1, fit_loop), (locked, "ddpm_lightning.training.module")):
            warnings.warn_explicit(f"Found {count}{eval_mode}", UserWarning, "x.py", 1, module=module)
        warnings.warn_explicit(f"Found {locked}{eval_mode}", UserWarning, "x.py", 1, module=fit_loop)
    assert [str(w.message) for w in caught[len(shown):]] == [f"Found {n}{eval_mode}" for n in (locked + 1, locked - 1, locked)]


def test_training_leaves_the_base_bitwise_unchanged_and_moves_only_the_branch(base, run):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    before = base_net_state(base)
    for part in ("state_dict", "current_model_state"):  # EMA and raw weights
        state = ckpt[part]
        for k, v in before.items():
            assert torch.equal(state[f"net.base.{k}"], v), f"{part}: base {k} changed"
    raw = ckpt["current_model_state"]
    for i in range(len(load_model(run / "checkpoints" / "last.ckpt").net.control.zero_convs)):
        assert torch.count_nonzero(raw[f"net.control.zero_convs.{i}.weight"]) > 0
    moved = [k for k in before if k.startswith(("down.", "mid.")) and not torch.equal(raw[f"net.control.{k}"], before[k])]
    assert moved  # the trainable copy left the base weights it started from


def test_a_resumed_controlnet_run_ends_bitwise_as_the_uninterrupted_one(base, run, tmp_path):
    train(compose_cfg(CN + [f"base_ckpt={base}", f"ckpt_path={run / 'checkpoints' / 'step_0000002.ckpt'}"], tmp_path))
    straight = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    for part in ("state_dict", "current_model_state"):
        for k, v in straight[part].items():
            assert torch.equal(resumed[part][k], v), f"{part} {k} differs after resume"


def test_evaluate_reports_adherence_and_scale_zero_samples_the_base(base, run, tmp_path):
    from helpers.config import eval_cfg

    from ddpm_lightning.tasks import evaluate

    ckpt = run / "checkpoints" / "last.ckpt"
    result = evaluate(eval_cfg(ckpt, tmp_path / "c", "num_samples=4"))
    assert result["metrics"]["adherence"] > 0 and result["control"]["split"] == "val"
    model = load_model(ckpt)
    samples = to_model_range(torch.from_numpy(np.load(tmp_path / "c" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2))
    dm = build(OmegaConf.load(run / "config.yaml").data)
    dm.setup("validate")
    hints = split_hints(model, torch.stack([dm.val_set[i][0] for i in range(4)]), range(4))
    assert result["metrics"]["adherence"] == pytest.approx(float(LowRes(2).adherence(samples, hints).mean()), rel=1e-5)
    w, h = Image.open(tmp_path / "c" / "grid.png").size
    assert (w, h) == (2 + 4 * 10, 2 + 2 * 10)  # 4 images: 2 rows of condition | sample pairs
    zero = evaluate(eval_cfg(ckpt, tmp_path / "z", "num_samples=4", "control.scale=0"))
    plain = evaluate(eval_cfg(base, tmp_path / "b", "num_samples=4"))
    assert np.array_equal(np.load(tmp_path / "z" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"])
    assert zero["control"]["scale"] == 0.0 and "adherence" not in plain["metrics"]


def test_evaluate_takes_conditions_from_a_folder_and_refuses_bad_files(run, tmp_path):
    from helpers.config import eval_cfg

    from ddpm_lightning.tasks import evaluate

    ckpt = run / "checkpoints" / "last.ckpt"
    folder = tmp_path / "conds"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(g.integers(0, 256, (4, 4), dtype=np.uint8)).save(folder / f"{i}.png")
    result = evaluate(eval_cfg(ckpt, tmp_path / "f", "num_samples=4", f"control.folder={folder}"))
    assert result["control"]["folder"] == str(folder) and result["control"]["conditions"] == 2
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "2.png")
    with pytest.raises(ValueError, match="control.folder"):
        evaluate(eval_cfg(ckpt, tmp_path / "g", "num_samples=4", f"control.folder={folder}"))
    (folder / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"control.folder: .*2.png is not a readable image"):
        evaluate(eval_cfg(ckpt, tmp_path / "h", "num_samples=4", f"control.folder={folder}"))
    assert not (tmp_path / "h" / "shards").exists() or not any((tmp_path / "h" / "shards").iterdir())


def folder_of(tmp_path, name: str, image: Image.Image, **save) -> object:
    """A condition folder holding one image, a.png."""
    folder = tmp_path / name
    folder.mkdir()
    image.save(folder / "a.png", **save)
    return folder


def model_range(a) -> torch.Tensor:
    return to_model_range(torch.tensor(a, dtype=torch.uint8))


def palette(indices, colours) -> Image.Image:
    im = Image.fromarray(np.array(indices, np.uint8), "P")
    im.putpalette([v for c in colours for v in c])
    return im


def test_condition_images_are_converted_by_their_mode(tmp_path):
    """16-bit grayscale is scaled to 8 bits (it wrapped modulo 256: 16384 and 32768 read as 0), 1-bit reads 0 / 255
    (not 0 / 1), a palette image its colours (not its indices): grey ones as L, others as RGB, with transparency
    as alpha; a mode that is not read (32-bit float) is refused, naming the file."""
    sixteen = Image.fromarray(np.array([[0, 16384], [32768, 65535]], np.uint16))
    folder = folder_of(tmp_path, "i16", sixteen)
    assert Image.open(folder / "a.png").mode in ("I;16", "I")
    assert torch.equal(load_folder(folder, Edges(), 1, 2), model_range([[[[0, 64], [128, 255]]]]))
    folder = folder_of(tmp_path, "bits", Image.fromarray(np.array([[0, 1], [1, 0]], bool)))
    assert Image.open(folder / "a.png").mode == "1"
    assert torch.equal(load_folder(folder, Edges(), 1, 2), model_range([[[[0, 255], [255, 0]]]]))
    greys = palette([[0, 1], [2, 1]], [(0, 0, 0), (255, 255, 255), (128, 128, 128)])
    assert torch.equal(load_folder(folder_of(tmp_path, "greys", greys), Edges(), 1, 2), model_range([[[[0, 255], [128, 255]]]]))
    colours = palette([[0, 1], [2, 1]], [(255, 0, 0), (0, 255, 0), (10, 20, 30)])
    hints = load_folder(folder_of(tmp_path, "colours", colours), LowRes(2), 3, 4)  # lowres 2x2, shown 4x4
    want = model_range([[[[255, 0], [10, 0]], [[0, 255], [20, 255]], [[0, 0], [30, 0]]]])
    assert torch.equal(hints[..., ::2, ::2], want)
    hints = load_folder(folder_of(tmp_path, "transparent", greys, transparency=0), Mask(), 1, 2)  # alpha 0: fill in
    assert torch.equal(hints[:, 1], torch.tensor([[[-1.0, 1.0], [1.0, 1.0]]]))
    assert torch.equal(hints[:, 0, 1], model_range([[128, 255]]))
    folder = folder_of(tmp_path, "float", Image.fromarray(np.zeros((2, 2), np.float32)), format="TIFF")
    with pytest.raises(ValueError, match=r"control.folder: .*a.png has the image mode F"):
        load_folder(folder, Edges(), 1, 2)


def test_a_fifo_named_like_a_condition_image_is_refused_without_blocking(tmp_path):
    folder = folder_of(tmp_path, "conds", Image.fromarray(np.zeros((2, 2), np.uint8)))
    os.mkfifo(folder / "b.png")
    with pytest.raises(ValueError, match=r"control.folder: .*b.png is not a regular file"):
        promptly(lambda: load_folder(folder, Edges(), 1, 2), fifos=[folder / "b.png"])


def test_bad_controlnet_configs_stop_before_training(base, run, tmp_path):
    def fails(overrides, exc, match):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        with pytest.raises(exc, match=match):
            train(compose_cfg(overrides, out))
        assert not (out / "checkpoints").exists()

    fails(["control=lowres", f"base_ckpt={base}"], ValueError, "experiment=controlnet_digits")
    fails(CN, ValueError, "set base_ckpt=")
    fails(CN + [f"base_ckpt={tmp_path / 'missing.ckpt'}"], FileNotFoundError, "base_ckpt=")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(open(base, "rb").read()[:1000])
    fails(CN + [f"base_ckpt={corrupt}"], ValueError, r"\(base_ckpt\) is not a readable")
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(base, weights_only=False)
    ckpt["hyper_parameters"]["net"]["ch"] = 64
    torch.save(ckpt, other)
    fails(CN + [f"base_ckpt={other}"], ValueError, "base_ckpt=.*another architecture")
    fails(CN + [f"base_ckpt={run / 'checkpoints' / 'last.ckpt'}"], ValueError, "is a ControlNet checkpoint")
    fails(CN + [f"base_ckpt={base}", "data.image_size=16"], ValueError, "data.image_size=16 differs")
    fails(CN + [f"base_ckpt={base}", "callbacks.samples._target_=ddpm_lightning.training.callbacks.SampleGrid"], ValueError, "ControlSampleGrid")
    # the base run's own directory as the output: refused before anything is written there
    inside = tmp_path / "baserun"
    (inside / "checkpoints").mkdir(parents=True)
    shutil.copy(base, inside / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="paths.output_dir"):
        train(compose_cfg(CN + [f"base_ckpt={inside / 'checkpoints' / 'last.ckpt'}"], inside))
    assert sorted(p.name for p in inside.rglob("*")) == ["checkpoints", "last.ckpt"]


def blocks(n: int, g: torch.Generator) -> torch.Tensor:
    """A mixture of 2^16 images: each 2x2 block of an 8x8 image is +0.6 or -0.6 at random, so the 4x4 lowres
    condition carries the whole answer while the unconditioned base can only guess it."""
    signs = torch.randint(0, 2, (n, 1, 4, 4), generator=g).float() * 2 - 1
    return 0.6 * signs.repeat_interleave(2, -1).repeat_interleave(2, -2)


def fit(module: DiffusionModule, steps: int, g: torch.Generator) -> None:
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    for _ in range(steps):
        loss = module._loss((blocks(32, g), torch.zeros(32, dtype=torch.long)))[0]["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
def test_when_the_condition_carries_the_answer_short_training_improves_adherence(tmp_path):
    """A base trained on the block mixture, then a lowres ControlNet trained briefly: the samples' adherence error
    (and that of the one-step x_0 estimate at t = 500) falls clearly below the base model's (conditioning_scale 0)."""
    g = torch.Generator().manual_seed(0)
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-3}
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 10}
    schedule = {"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 1000}
    base = DiffusionModule(net=UNET, schedule=schedule, sampler=sampler, optimizer=optimizer, image_size=8, channels=1, warmup_steps=0)
    fit(base, 100, g)
    torch.save({"hyper_parameters": dict(base.hparams), "state_dict": base.state_dict()}, tmp_path / "base.ckpt")
    cn = ControlNetModule(str(tmp_path / "base.ckpt"), CONDITIONS["lowres"], optimizer, 8, 1, sampler=sampler)
    x0 = blocks(64, torch.Generator().manual_seed(1))
    seeds = list(range(64))
    hint = split_hints(cn, x0, seeds)
    t = torch.full((64,), 500)
    x_t = cn.schedule.alpha(t)[:, None, None, None] * x0 + cn.schedule.sigma(t)[:, None, None, None] * torch.randn(x0.shape, generator=g)

    def adherence(scale: float) -> tuple[float, float]:
        cn.eval()
        with torch.no_grad():
            samples = cn.sample(seeds, hint=hint, conditioning_scale=scale)
            x0_hat = cn.denoiser.x0(x_t, t, hint=hint, conditioning_scale=scale)
        op = cn.net.condition
        return float(op.adherence(samples, hint).mean()), float(op.adherence(x0_hat, hint).mean())

    before = adherence(0.0)
    assert adherence(1.0) == before  # zero-initialised: the untrained ControlNet is the base
    fit(cn, 100, g)
    after = adherence(1.0)
    assert after[0] < 0.9 * before[0] and after[1] < 0.5 * before[1], (before, after)
    assert adherence(0.0) == before  # the base itself did not move


def test_controlnet_cifar10_builds_on_a_cifar10_base_and_trains_one_batch(tmp_path):
    """experiment=controlnet_cifar10 on a small base trained on fabricated CIFAR-10 files (the experiment takes its
    network from the base): 4x super-resolution (8x8 conditions), one batch through the loss."""
    from helpers.fake_datasets import make_cifar10

    make_cifar10(tmp_path / "data")
    data = [f"data.root={tmp_path / 'data'}", "data.download=false", "data.batch_size=4", "data.num_workers=0"]
    train(compose_cfg(["data=cifar10", "data.image_size=32", "model.attn_resolutions=[16]", "trainer.max_steps=1", "logger=none",
                       "callbacks.samples.every_n_steps=0", "trainer.limit_val_batches=0", *data], tmp_path / "base"))
    cfg = compose_cfg(["experiment=controlnet_cifar10", f"base_ckpt={tmp_path / 'base' / 'checkpoints' / 'last.ckpt'}", *data], tmp_path, tiny=False)
    OmegaConf.resolve(cfg)
    module, dm = build(cfg.module), build(cfg.data)
    assert isinstance(module.net.condition, LowRes) and module.net.condition.factor == 4 and module.net.hint_shape == (3, 32, 32)
    assert cfg.callbacks.samples._target_.endswith("ControlSampleGrid")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert torch.isfinite(module._loss((x[:2], y[:2]))[0]["loss"]).all()
