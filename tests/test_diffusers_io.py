"""diffusers UNet2DModel / DDPMPipeline folders in and out (ddpm_lightning.interop.diffusers), offline: the diffusers
models are built locally from the published configs and given random weights everywhere (no layer left at zero),
so that a wrong mapping changes the output."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.config import compose_cfg
from ddpm_lightning.interop import diffusers as io
from ddpm_lightning.training.module import DiffusionModule
from ddpm_lightning.nets import UNet
from ddpm_lightning.diffusion.denoiser import Denoiser
from ddpm_lightning.diffusion.samplers import ddpm as ddpm_sampler
from ddpm_lightning.interop.parity import (
    CLASS_COND, GOOGLE_CIFAR10, GOOGLE_SCHEDULER, SIZE64, TRAIN_UNCONDITIONAL, FixedOutput as _Fixed, QueuedNoise as _Noise,
    diffusers_unet, inputs, randomize, save_pipeline,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32, largest absolute difference of the outputs (which are O(1))


def imported(folder, null_label=None) -> DiffusionModule:
    return io.load_module(folder, null_label, channels_last=False)  # contiguous: PyTorch's own GroupNorm / convolutions


def test_google_ddpm_cifar10_config_imports_to_the_same_function(tmp_path):
    unet = diffusers_unet(GOOGLE_CIFAR10)
    module = imported(save_pipeline(unet, tmp_path / "pipe"))
    net = module.net
    assert sum(p.numel() for p in net.parameters()) == 35_746_307  # Ho et al.'s CIFAR-10 model
    assert {k: module.hparams.net[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")} == {
        "ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16]}
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert module.hparams.schedule == {"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert (module.hparams.sampler["variance"], module.hparams.sampler["clip_denoised"], module.hparams.parameterization) == ("fixed_small", True, "eps")
    x, t = inputs(unet)
    with torch.no_grad():
        want = unet(x, t).sample
        got = net(x, t.float())
        assert (got - want).abs().max() < TOL
        # The test can fail: the same weights with symmetric padding (our default) compute another function.
        other = UNet(**{**{k: v for k, v in module.hparams.net.items() if k != "_target_"}, "downsample_padding": "symmetric"}).eval()
        other.load_state_dict(net.state_dict())
        assert (other(x, t.float()) - want).abs().max() > 1e-3


@pytest.mark.parametrize("config", [CLASS_COND, SIZE64, TRAIN_UNCONDITIONAL],
                         ids=["class_conditional", "64px_two_attention_levels", "train_unconditional_defaults"])
def test_other_layouts_import_to_the_same_function(tmp_path, config):
    unet = diffusers_unet(config, seed=2)
    module = imported(save_pipeline(unet, tmp_path / "pipe"), null_label=True if config.get("num_class_embeds") else None)
    x, t = inputs(unet, 4)
    cond = {}
    if config.get("num_class_embeds"):
        y = torch.tensor([0, 3, 1, 4])  # 4 = num_class_embeds - 1: our null label
        assert module.net.num_classes == 4
        cond = {"class_labels": y}
    with torch.no_grad():
        want = unet(x, t, **cond).sample
        got = module.net(x, t.float(), y=cond.get("class_labels"))
    assert (got - want).abs().max() < TOL
    if cond:  # no label: our null label, the last of diffusers' rows
        with torch.no_grad():
            assert (module.net(x, t.float()) - unet(x, t, class_labels=torch.full((4,), 4)).sample).abs().max() < TOL


def test_legacy_attention_names_and_bin_weights(tmp_path):
    """Files written before diffusers 0.14 name the attention query / key / value / proj_attn."""
    unet = diffusers_unet(SIZE64, seed=3)
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in unet.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        state[k] = v
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.warns(UserWarning, match="no scheduler config"):
        module = imported(folder)
    x, t = inputs(unet)
    with torch.no_grad():
        assert (module.net(x, t.float()) - unet(x, t).sample).abs().max() < TOL


SMALL = ["data.image_size=8", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0.0",
         "module.channels_last=false"]  # contiguous tensors: PyTorch's own GroupNorm / convolutions, no kernel build


def our_checkpoint(path, overrides=(), seed=0):
    """A checkpoint of ours with random EMA and raw weights, as load_model reads it."""
    cfg = compose_cfg([*SMALL, *overrides], tiny=False)
    from hydra.utils import instantiate

    module = instantiate(cfg.module)
    randomize(module.net, seed)
    ema = {k: v.clone() for k, v in module.state_dict().items()}
    raw = {k: v + 0.01 for k, v in ema.items()}
    torch.save({"state_dict": ema, "current_model_state": raw, "hyper_parameters": dict(module.hparams), "global_step": 5}, path)
    return module


def test_export_loads_in_diffusers_and_imports_back_bitwise(tmp_path):
    ours = our_checkpoint(tmp_path / "a.ckpt", ["model.num_classes=3", "sampler.variance=fixed_small"])
    io.main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "pipe")])
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.unet.config.num_class_embeds == 4 and pipe.scheduler.config.variance_type == "fixed_small"
    net = ours.net.eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    y = torch.tensor([0, 2, 3])  # 3: the null label
    with torch.no_grad():
        assert (pipe.unet(x, t, class_labels=y).sample - net(x, t.float(), y=y)).abs().max() < TOL
    back = imported(tmp_path / "pipe", null_label=True)
    assert all(torch.equal(v, back.net.state_dict()[k]) for k, v in net.state_dict().items())
    assert {k: v for k, v in back.hparams.net.items() if k not in ("fused_norm", "winograd")} == {
        **{k: v for k, v in ours.hparams.net.items() if k not in ("fused_norm", "winograd")},
        "out_channels": None, "norm_groups": 32, "norm_eps": 1e-5, "downsample_padding": "symmetric"}
    assert back.hparams.schedule == {**ours.hparams.schedule, "beta_start": 1e-4, "beta_end": 0.02}
    # --raw: the trained weights rather than the EMA ones; --unet-only: a bare UNet2DModel folder.
    io.main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "raw"), "--raw", "--unet-only"])
    raw = diffusers.UNet2DModel.from_pretrained(tmp_path / "raw")
    assert torch.equal(raw.conv_in.weight, pipe.unet.conv_in.weight + 0.01)


def test_exported_pipeline_samples_in_diffusers(tmp_path):
    our_checkpoint(tmp_path / "a.ckpt")
    io.export(tmp_path / "a.ckpt", tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize(
    "schedule, parameterization, variance",
    [
        ({"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}, "eps", "fixed_large"),
        ({"_target_": "ddpm_lightning.diffusion.schedules.cosine", "T": 1000, "s": 0.008, "max_beta": 0.999}, "v", "fixed_small"),
        ({"_target_": "ddpm_lightning.diffusion.schedules.scaled_linear", "T": 500, "beta_start": 8.5e-4, "beta_end": 0.012}, "x0", "fixed_small"),
    ],
    ids=["linear", "squaredcos_cap_v2", "scaled_linear"],
)
def test_exported_scheduler_has_our_betas_and_ancestral_step(schedule, parameterization, variance):
    from hydra.utils import instantiate

    ours = instantiate(schedule)
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True, "variance": variance, "clip_denoised": True,
               "spacing": "trailing"}
    config = io.diffusers_scheduler_config(schedule, parameterization, sampler)
    theirs = diffusers.DDPMScheduler(**config)
    assert (theirs.betas - ours.betas).abs().max() < 1e-8
    # diffusers multiplies the T alphas in float32 (T roundings), ours in float64 rounded once: a few float32
    # ulps apart (ulp 6e-8 just below 1). Measured: 2.4e-7 linear, 3.0e-7 cosine, 4.2e-7 scaled_linear (T=500).
    assert (theirs.alphas_cumprod - ours.alphas_cumprod).abs().max() < 5e-7
    assert io.schedule_from_diffusers(config) == (schedule, parameterization, sampler)
    # Three ancestral steps from x_T with the same network output and noise (diffusers draws its noise with
    # torch.randn from the generator it is given: a fresh one seeded 100 + k gives z[k]).
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    z = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + k)) for k in range(3)]
    steps = []

    def stop_after_three(i, x_prev):
        steps.append(x_prev)
        if len(steps) == 3:
            raise StopIteration

    with pytest.raises(StopIteration):
        ddpm_sampler(Denoiser(_Fixed(out), ours, parameterization), x, _Noise(z), variance, True, callback=stop_after_three)
    x_t = x
    for k, t in enumerate(range(ours.T - 1, ours.T - 4, -1)):
        step = theirs.step(out, t, x_t, generator=torch.Generator().manual_seed(100 + k)).prev_sample
        assert (step - steps[k]).abs().max() < 1e-5
        x_t = steps[k]  # each step from the same x_t


@pytest.fixture
def small_pipe(tmp_path):
    """A 16x16 DDPMPipeline folder (class-conditional layout) and its diffusers UNet."""
    unet = diffusers_unet({**CLASS_COND, "num_class_embeds": None, "in_channels": 1, "out_channels": 1}, seed=4)
    return save_pipeline(unet, tmp_path / "pipe"), unet


def test_missing_file_wrong_shapes_and_unsupported_blocks_fail_before_any_weights_load(small_pipe, monkeypatch):
    folder, unet = small_pipe
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    # Unsupported configurations are refused from the JSON alone, every difference listed.
    monkeypatch.setattr(io, "read_state", lambda *_: pytest.fail("weights read before the config was checked"))
    config_file.write_text(json.dumps({**config, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D"], "attention_head_dim": 24}))
    with pytest.raises(io.UnsupportedConfig) as e:
        io.load_module(folder)
    assert "'CrossAttnDownBlock2D' is not one of ['DownBlock2D', 'AttnDownBlock2D']" in str(e.value)
    assert "attention_head_dim=24: must divide the channels of every attention block" in str(e.value)
    config_file.write_text(json.dumps({**config, "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "time_embedding_type": "fourier"}))
    with pytest.raises(io.UnsupportedConfig, match=r"(?s)time_embedding_type='fourier': our U-Net supports only 'positional'.*down_block_types\[2\]=.AttnDownBlock2D. but up_block_types\[0\]=.UpBlock2D."):
        io.load_module(folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**GOOGLE_SCHEDULER, "variance_type": "learned_range", "beta_schedule": "sigmoid"}))
    config_file.write_text(json.dumps(config))
    with pytest.raises(io.UnsupportedConfig, match=r"(?s)beta_schedule='sigmoid'.*variance_type='learned_range'"):
        io.load_module(folder)
    sched.write_text(json.dumps(GOOGLE_SCHEDULER))
    monkeypatch.undo()
    # Wrong shapes: a config with more channels than the weights have.
    config_file.write_text(json.dumps({**config, "block_out_channels": [32, 64, 128]}))
    with pytest.raises(ValueError, match=r"file has \(64, 64, 3, 3\), the config needs \(128, 128, 3, 3\)"):
        io.load_module(folder)
    config_file.write_text(json.dumps(config))
    # A missing file.
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin"):
        io.load_module(folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        io.load_module(folder)


def test_hub_id_offline_names_the_folder_to_pass(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"hf download google/ddpm-cifar10-32 --local-dir <folder>.*init_from=<folder>"):
        io.load_module("google/ddpm-cifar10-32")


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    our_checkpoint(tmp_path / "ve.ckpt", ["schedule=ncsn", "sampler=ald"])
    with pytest.raises(io.UnsupportedConfig, match="NCSN, score-SDE, EDM and rectified-flow schedules have no equivalent"):
        io.export(tmp_path / "ve.ckpt", tmp_path / "out")
    our_checkpoint(tmp_path / "cos.ckpt", ["schedule=cosine", "schedule.s=0.01"])
    with pytest.raises(io.UnsupportedConfig, match="squaredcos_cap_v2 fixes 0.008 and 0.999"):
        io.export(tmp_path / "cos.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    io.export(tmp_path / "ve.ckpt", tmp_path / "unet", unet_only=True)  # the network alone is expressible
    assert (tmp_path / "unet" / "config.json").is_file()


def hydra_run_cfg(overrides, output_dir):
    """The train config as `python train.py <overrides>` composes it, with HydraConfig set (so the run's
    command-line overrides are known, as under @hydra.main)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from helpers.config import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


RUN = ["data.image_size=16", "data.batch_size=4", "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.val_check_interval=2",
       "trainer.enable_model_summary=false", "callbacks.samples.every_n_steps=100", "callbacks.progress.refresh_rate=0",
       "logger=none", "module.channels_last=false", "module.warmup_steps=1", "callbacks.samples.num_samples=2"]


def test_train_init_from_fine_tunes_the_import_and_refuses_contradictions(small_pipe, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from ddpm_lightning.compose import build
    from ddpm_lightning.tasks import train

    folder, unet = small_pipe
    try:
        cfg = hydra_run_cfg([*RUN, f"init_from={folder}", "model.dropout=0.1"], tmp_path / "a")
        state = io.init_train_config(cfg)
        assert cfg.model.ch == 32 and cfg.model.ch_mult == [1, 2, 2] and cfg.model.dropout == 0.1
        assert cfg.sampler.variance == "fixed_small" and cfg.schedule._target_.endswith("linear")
        module = build(cfg.module)
        module.net.load_state_dict(state)
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
        with torch.no_grad():
            assert (module.net.eval()(x, t.float()) - unet(x, t).sample).abs().max() < TOL
        # The whole run: two fine-tuning steps from the imported weights.
        metrics = train(hydra_run_cfg([*RUN, f"init_from={folder}", "sampler=ddim", "sampler.steps=2"], tmp_path / "b"))
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["hyper_parameters"]["net"]["ch_mult"] == [1, 2, 2] and saved["hyper_parameters"]["sampler"]["steps"] == 2
        # Contradicting overrides are refused, listed, before anything is built.
        with pytest.raises(ValueError, match=r"(?s)model.ch: the config has 64, the import has 32.*module.parameterization='v'"):
            io.init_train_config(hydra_run_cfg([*RUN, f"init_from={folder}", "model.ch=64", "module.parameterization=v"], tmp_path / "c"))
        with pytest.raises(ValueError, match=r"(?s)model.ch_mult: the config has \[1, 2, 2, 2\].*schedule._target_"):
            io.init_train_config(hydra_run_cfg([*RUN, f"init_from={folder}", "model=unet_cifar10", "schedule=cosine"], tmp_path / "d"))
        with pytest.raises(ValueError, match=r"data.image_size=8: the imported model takes 16x16"):
            io.init_train_config(hydra_run_cfg([*RUN, f"init_from={folder}", "data.image_size=8"], tmp_path / "e"))
    finally:
        HydraConfig.instance().cfg = None


def test_evaluate_init_from_samples_the_import(small_pipe, tmp_path, monkeypatch):
    import functools

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from helpers.config import CONF
    from ddpm_lightning.tasks import evaluate

    folder, _ = small_pipe
    monkeypatch.setattr(io, "load_module", functools.partial(io.load_module, channels_last=False))  # no kernel build
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"init_from={folder}", f"output_dir={tmp_path / 'e'}", "sampler=ddim", "sampler.steps=2", "num_samples=2",
            "batch_size=2", "metrics=[]", "grid_size=2", "trainer.accelerator=cpu"])
    result = evaluate(cfg)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert (result["num_samples"], result["nfe"], result["checkpoint"]["path"]) == (2, 2, str(weights))
    assert (tmp_path / "e" / "samples.npz").is_file()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        both = compose(config_name="evaluate", overrides=[f"init_from={folder}", "ckpt_path=x.ckpt"])
    with pytest.raises(ValueError, match="exactly one of them"):
        evaluate(both)


def test_missing_extra_names_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[diffusers\]"'):
        io.export(tmp_path / "any.ckpt", tmp_path / "out")


LINEAR = {"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}


@pytest.mark.parametrize("target", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, written", [("trailing", "trailing"), ("leading", "leading"), ("linspace", "linspace"),
                                              ("uniform", "leading")])
def test_export_writes_the_samplers_timestep_spacing_and_import_reads_it(target, spacing, written):
    """The exported scheduler visits the same steps as our sampler; `uniform` (the old name) is leading."""
    sampler = {"_target_": f"ddpm_lightning.diffusion.samplers.{target}", "_partial_": True, "spacing": spacing}
    config = io.diffusers_scheduler_config(LINEAR, "eps", sampler)
    assert config["timestep_spacing"] == written and config["steps_offset"] == 0
    theirs = diffusers.DDPMScheduler(**config)
    theirs.set_timesteps(60)
    from ddpm_lightning.diffusion import schedules

    assert theirs.timesteps.tolist() == schedules.index_timesteps(1000, 60, spacing)
    assert io.schedule_from_diffusers(config)[2]["spacing"] == written


def test_spacing_diffusers_cannot_express_is_refused_both_ways():
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "spacing": "quadratic"}
    with pytest.raises(io.UnsupportedConfig, match="sampler.spacing='quadratic'"):
        io.diffusers_scheduler_config(LINEAR, "eps", sampler)
    assert io.schedule_from_diffusers({})[2]["spacing"] == "leading"  # diffusers' default
    with pytest.raises(io.UnsupportedConfig, match="steps_offset=1"):
        io.schedule_from_diffusers({"timestep_spacing": "leading", "steps_offset": 1})
    with pytest.raises(io.UnsupportedConfig, match="timestep_spacing='odd'"):
        io.schedule_from_diffusers({"timestep_spacing": "odd"})
    assert io.schedule_from_diffusers({"timestep_spacing": "trailing", "steps_offset": 1})[2]["spacing"] == "trailing"


def test_class_rows_need_an_explicit_null_label_and_a_model_without_one_never_draws_a_class_silently(tmp_path):
    """diffusers' num_class_embeds = K does not say whether row K - 1 is a null label: importing asks. With
    null_label=false all K rows are classes: label K - 1 samples as diffusers' class K - 1, and sampling without
    labels is refused (it used to draw class K - 1); export writes K rows back."""
    unet = diffusers_unet(CLASS_COND, seed=2)  # num_class_embeds = 5
    folder = save_pipeline(unet, tmp_path / "pipe")
    with pytest.raises(io.UnsupportedConfig, match="init_null_label=true .*init_null_label=false"):
        imported(folder)
    assert imported(folder, null_label=True).net.num_classes == 4
    module = imported(folder, null_label=False)
    assert module.net.num_classes == 5 and module.hparams.net["null_label"] is False
    x, t = inputs(unet, 4)
    y = torch.tensor([4, 0, 4, 2])
    with torch.no_grad():
        assert (module.net(x, t.float(), y=y) - unet(x, t, class_labels=y).sample).abs().max() < TOL
        with pytest.raises(ValueError, match="no null label"):
            module.net(x, t.float())
    ddim = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 2}
    assert module.sample(range(2), sampler=ddim, labels=[4, 4]).shape[0] == 2  # class 4 is a class here
    with pytest.raises(ValueError, match="no null label"):
        module.sample(range(2), sampler=ddim)
    assert io.diffusers_unet_config(module.hparams.net)["num_class_embeds"] == 5
    with pytest.raises(ValueError, match="module.p_uncond"):
        DiffusionModule(**{**dict(module.hparams), "p_uncond": 0.1})


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_diffusers_ddim_with_clipped_model_output_is_our_ddim(tmp_path, spacing):
    """Our DDIM (clip_denoised) recomputes eps from the clipped x_0; diffusers' DDIMScheduler does so only with
    step(..., use_clipped_model_output=True). With it, on the exported scheduler config (same timestep_spacing), the
    two give the same samples; with diffusers' default they differ wherever x_0 was clipped."""
    unet = diffusers_unet({**CLASS_COND, "num_class_embeds": None}, seed=3)
    sampler = {"_target_": "ddpm_lightning.diffusion.samplers.ddim", "_partial_": True, "steps": 10, "eta": 0.0,
               "clip_denoised": True, "spacing": spacing}
    folder = save_pipeline(unet, tmp_path / "pipe", io.diffusers_scheduler_config(LINEAR, "eps", sampler))
    module = imported(folder)
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    from ddpm_lightning.diffusion.samplers import ddim

    with torch.no_grad():
        ours = ddim(module.denoiser, x_T.clone(), None, steps=10, eta=0.0, spacing=spacing, clip_denoised=True)
        scheduler = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config)
        assert scheduler.config.timestep_spacing == spacing
        scheduler.set_timesteps(10)
        theirs = {}
        for clipped in (True, False):
            x = x_T.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clipped).prev_sample
            theirs[clipped] = x
    assert (ours - theirs[True]).abs().max() < 1e-4
    assert (ours - theirs[False]).abs().max() > 1e-2


def test_train_unconditional_models_import_fine_tune_and_export_exactly(tmp_path):
    """diffusers' own UNet2DModel defaults (8-dim multi-head attention, freq_shift 0, [cos, sin]), as the community
    checkpoints trained with train_unconditional.py have them: imported to the same function (and not to it with one
    head or Ho et al.'s frequencies), fine-tuned, exported, loaded back by diffusers to the same function."""
    from ddpm_lightning.tasks import train

    unet = diffusers_unet(TRAIN_UNCONDITIONAL, seed=5)
    folder = save_pipeline(unet, tmp_path / "pipe")
    module = imported(folder)
    assert (module.hparams.net["attention_head_dim"], module.hparams.net["freq_shift"]) == (8, 0)
    assert [m.heads for m in module.net.modules() if hasattr(m, "heads")] == [4, 4, 8, 4, 4, 4]  # 32 / 8 and 64 / 8
    x, t = inputs(unet, 3)
    with torch.no_grad():
        want = unet(x, t).sample
        assert (module.net(x, t.float()) - want).abs().max() < TOL
        for change in ({"attention_head_dim": None}, {"freq_shift": 1}):  # the test can fail
            other = UNet(**{**{k: v for k, v in module.hparams.net.items() if k != "_target_"}, **change}).eval()
            other.load_state_dict(module.net.state_dict())
            assert (other(x, t.float()) - want).abs().max() > 1e-3, change
    try:
        train(hydra_run_cfg([*RUN, f"init_from={folder}", "sampler=ddim", "sampler.steps=2"], tmp_path / "run"))
    finally:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().cfg = None
    io.main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "out")])
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    assert (back.config.attention_head_dim, back.config.freq_shift) == (8, 0)
    tuned = io.load_module(tmp_path / "out", None, channels_last=False).net.eval()
    with torch.no_grad():
        assert (back(x, t).sample - tuned(x, t.float())).abs().max() < TOL
        assert (back(x, t).sample - want).abs().max() > 1e-6  # the fine-tuning moved the weights
