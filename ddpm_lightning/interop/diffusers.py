"""Pretrained weights in and out: diffusers' UNet2DModel and DDPMPipeline folders <-> this package's UNet.

The DDPM family of diffusers blocks (DownBlock2D, AttnDownBlock2D, UNetMidBlock2D, UpBlock2D, AttnUpBlock2D) is
the U-Net of Ho et al. 2020 App. B, which `ddpm_lightning.nets.UNet` already is; importing is a table from one
set of parameter names to the other plus the two numerical options diffusers' DDPM configs choose differently
(`downsample_padding=0`: the strided convolution pads (0, 1, 0, 1); `norm_eps`). The scheduler config maps to a
schedule, a parameterisation and the DDPM sampler's variance and clipping.

Class labels: diffusers' `num_class_embeds` = K rows are either our `num_classes` = K - 1 classes plus the null label
of classifier-free guidance (our last row, index num_classes; what our export writes), or K classes and no null
label (`model.null_label=false`: such a model samples only with labels). diffusers' config does not say which, so
importing a class-conditional UNet needs `null_label` (Hydra: `init_null_label=true|false`); export and import are
exact inverses either way.

Import needs only `safetensors` (or a `.bin` read with `torch.load(weights_only=True)`); export needs diffusers:
`pip install -e ".[diffusers]"`. Command line (see README "Pretrained weights"):

    python -m ddpm_lightning.interop.diffusers export <ckpt> <out_folder> [--raw] [--unet-only]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from torch import Tensor

from ddpm_lightning import registry
from ddpm_lightning.checkpointing import load_file
from ddpm_lightning.diffusion.grids import DEFAULT_SPACING, discrete_spacing
from ddpm_lightning.loading import load_model
from ddpm_lightning.nets.unet import UNet
from ddpm_lightning.training.module import DiffusionModule

EXTRA = 'pip install -e ".[diffusers]"'
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
UNET_TARGET = "ddpm_lightning.nets.UNet"
SCHEDULES = {  # our schedule _target_ -> diffusers beta_schedule
    "ddpm_lightning.diffusion.schedules.linear": "linear",
    "ddpm_lightning.diffusion.schedules.scaled_linear": "scaled_linear",
    "ddpm_lightning.diffusion.schedules.cosine": "squaredcos_cap_v2",
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers prediction_type -> ours
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-4}  # conf/module/diffusion.yaml's

# UNet2DModel's constructor defaults (diffusers 0.2x-0.4x), applied to keys a config.json leaves out, as diffusers does.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# DDPMScheduler's constructor defaults.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading", "steps_offset": 0,
}
DIFFUSERS_SPACINGS = ("trailing", "leading", "linspace")  # timestep_spacing: our discrete spacings of the same name


class UnsupportedConfig(ValueError):
    """A configuration the other side cannot express; the message lists every difference."""

    def __init__(self, what: str, problems: list[str]):
        super().__init__(f"{what}:\n  " + "\n  ".join(problems))
        self.problems = problems


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed to read or write diffusers weights: {EXTRA}") from e


def _unet_defaults() -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(UNet).parameters.items()}


# ---------------------------------------------------------------------------------------------- config mapping


def net_config_from_diffusers(config: dict, null_label: bool | None = None) -> dict:
    """Our model config (UNet keyword arguments with `_target_`) computing the same function as a UNet2DModel
    config; raises UnsupportedConfig listing every key our U-Net cannot express. For K class rows, `null_label`
    says whether the last is the null label (K - 1 classes) or a class (K classes); it must be given."""
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c.get("attn_num_head_channels") is not None:  # the key's name before diffusers 0.13
        c["attention_head_dim"] = c.pop("attn_num_head_channels")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    problems = _option_problems(config, c) + _layout_problems(c, size) + _class_row_problems(c, null_label)
    if problems:
        raise UnsupportedConfig("this UNet2DModel config differs from what ddpm_lightning.nets.UNet can express", problems)
    channels, down = list(c["block_out_channels"]), list(c["down_block_types"])
    ch = channels[0]
    return {
        "_target_": UNET_TARGET,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"] if c["out_channels"] != c["in_channels"] else None,
        "learn_sigma": False,
        "ch": ch,
        "ch_mult": [x // ch for x in channels],
        "num_res_blocks": c["layers_per_block"],
        "attn_resolutions": [size // 2**level for level, b in enumerate(down) if DOWN_BLOCKS[b]],
        "dropout": float(c["dropout"]),
        "image_size": size,
        "num_classes": c["num_class_embeds"] - int(bool(null_label)) if c["num_class_embeds"] else None,
        **({"null_label": False} if c["num_class_embeds"] and null_label is False else {}),
        "norm_groups": c["norm_num_groups"],
        "norm_eps": float(c["norm_eps"]),
        "downsample_padding": "tf_same" if c["downsample_padding"] == 0 else "symmetric",
        **_heads_and_shift(c["attention_head_dim"], attn_channels_of(c), c["freq_shift"]),
    }


def attn_channels_of(c: dict) -> list[int]:
    """The channels of the attention blocks of a UNet2DModel config (the attention levels and the middle block)."""
    channels = list(c["block_out_channels"])
    return [x for x, b in zip(channels, c["down_block_types"]) if DOWN_BLOCKS[b]] + channels[-1:]


def _heads_and_shift(head_dim: int | None, attn_channels: list[int], freq_shift: int) -> dict:
    """Our attention_head_dim (left out for one head per block, the paper's, so today's configs stay as they were)
    and freq_shift (left out for Ho et al.'s 1)."""
    out = {} if head_dim is None or all(x == head_dim for x in attn_channels) else {"attention_head_dim": int(head_dim)}
    return {**out, **({} if freq_shift == 1 else {"freq_shift": int(freq_shift)})}


def _option_problems(config: dict, c: dict) -> list[str]:
    """The class name and the options our U-Net has one value of (embedding, blocks' kinds, activation)."""
    problems = []
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        problems.append(f"_class_name={config['_class_name']!r}: only UNet2DModel is supported")
    unknown = sorted(k for k in c if k not in UNET_DEFAULTS and k != "attn_num_head_channels" and c[k] is not None)
    problems += [f"{k}={c[k]!r}: unknown UNet2DModel option" for k in unknown]
    expected = {
        "center_input_sample": False, "time_embedding_type": "positional",
        "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
        "upsample_type": "conv", "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    }
    problems += [f"{k}={c[k]!r}: our U-Net supports only {v!r}" for k, v in expected.items() if c[k] != v]
    if c["act_fn"] not in ("silu", "swish"):
        problems.append(f"act_fn={c['act_fn']!r}: our U-Net uses SiLU")
    return problems


def _layout_problems(c: dict, size: Any) -> list[str]:
    """The size, the channels and blocks per level, padding, normalisation and attention heads."""
    problems = []
    if not isinstance(size, int):
        problems.append(f"sample_size={c['sample_size']!r}: a square size is needed")
    channels = list(c["block_out_channels"])
    ch = channels[0]
    if any(x % ch for x in channels):
        problems.append(f"block_out_channels={channels}: every entry must be a multiple of the first (our ch * ch_mult)")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    problems += [f"down_block_types: {b!r} is not one of {list(DOWN_BLOCKS)}" for b in down if b not in DOWN_BLOCKS]
    problems += [f"up_block_types: {b!r} is not one of {list(UP_BLOCKS)}" for b in up if b not in UP_BLOCKS]
    if not len(down) == len(up) == len(channels):
        problems.append(f"{len(down)} down blocks, {len(up)} up blocks and {len(channels)} block_out_channels: they must agree")
    elif not any("not one of" in p for p in problems):
        for level, b in enumerate(down):
            if DOWN_BLOCKS[b] != UP_BLOCKS[up[len(up) - 1 - level]]:
                problems.append(
                    f"down_block_types[{level}]={b!r} but up_block_types[{len(up) - 1 - level}]={up[len(up) - 1 - level]!r}: "
                    "our U-Net has attention at the same resolutions in the encoder and the decoder"
                )
    if c["downsample_padding"] not in (0, 1):
        problems.append(f"downsample_padding={c['downsample_padding']!r}: 0 (pad (0, 1, 0, 1)) or 1 (symmetric) only")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']} differs from norm_num_groups={c['norm_num_groups']}")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']}: our U-Net's is 4 * block_out_channels[0] = {4 * ch}")
    head_dim = c["attention_head_dim"]
    attn_channels = [x for x, b in zip(channels, down) if DOWN_BLOCKS.get(b)] + channels[-1:]  # + the middle block
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1 or any(x % head_dim for x in attn_channels)):
        problems.append(f"attention_head_dim={head_dim!r}: must divide the channels of every attention block {attn_channels}")
    if not isinstance(c["freq_shift"], int) or c["freq_shift"] >= ch // 2:
        problems.append(f"freq_shift={c['freq_shift']!r}: an integer below half the embedding width {ch // 2}")
    return problems


def _class_row_problems(c: dict, null_label: bool | None) -> list[str]:
    """K class rows: whether the last is the null label must be said, and enough rows for it."""
    if c["num_class_embeds"] is None:
        return []
    if null_label is None:
        return [
            f"num_class_embeds={c['num_class_embeds']}: say whether the last class row is the null label of "
            f"classifier-free guidance: init_null_label=true ({c['num_class_embeds'] - 1} classes + null, as our "
            f"export writes) or init_null_label=false ({c['num_class_embeds']} classes, sampled only with labels)"
        ]
    if c["num_class_embeds"] < 1 + int(null_label):
        return [f"num_class_embeds={c['num_class_embeds']}: at least {1 + int(null_label)} rows"]
    return []


def _net_args(net: dict) -> dict:
    """Our UNet's keyword arguments (defaults filled in) from a model config; refuses another network."""
    target = net.get("_target_")
    if target not in (UNET_TARGET, "ddpm_lightning.nets.unet.UNet"):
        raise UnsupportedConfig("only ddpm_lightning.nets.UNet maps to UNet2DModel", [f"model._target_={target!r}"])
    defaults = _unet_defaults()
    unknown = sorted(set(net) - set(defaults) - {"_target_"})
    if unknown:
        raise UnsupportedConfig("model config keys unknown to ddpm_lightning.nets.UNet", unknown)
    return {**defaults, **{k: v for k, v in net.items() if k != "_target_"}}


def diffusers_unet_config(net: dict) -> dict:
    """The UNet2DModel config computing the same function as our model config `net`."""
    a = _net_args(net)
    if a.get("learn_sigma"):
        raise UnsupportedConfig("this U-Net cannot be written as a UNet2DModel", ["model.learn_sigma=true: learned variances are not exported"])
    n, size, attn = len(a["ch_mult"]), a["image_size"], set(a["attn_resolutions"])
    has_attn = [size // 2**level in attn for level in range(n)]
    return {
        "sample_size": size,
        "in_channels": a["in_channels"],
        "out_channels": a["out_channels"] or a["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": a["freq_shift"],  # Ho et al.'s 1: frequencies exp(-log(10000) i / (half - 1)), [sin, cos]
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if h else "DownBlock2D" for h in has_attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if h else "UpBlock2D" for h in reversed(has_attn)],
        "block_out_channels": [a["ch"] * m for m in a["ch_mult"]],
        "layers_per_block": a["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if a["downsample_padding"] == "tf_same" else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(a["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": a["attention_head_dim"],  # null: one head, the block's channels
        "norm_num_groups": a["norm_groups"],
        "norm_eps": float(a["norm_eps"]),
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": a["num_classes"] + int(bool(a["null_label"])) if a["num_classes"] else None,
    }


def schedule_from_diffusers(config: dict) -> tuple[dict, str, dict]:
    """(schedule config, parameterization, DDPM sampler config) for a DDPMScheduler config."""
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = []
    beta = {"T": int(c["num_train_timesteps"])}
    if c["beta_schedule"] == "linear":
        schedule = {"_target_": "ddpm_lightning.diffusion.schedules.linear", **beta, "beta_start": c["beta_start"], "beta_end": c["beta_end"]}
    elif c["beta_schedule"] == "scaled_linear":
        schedule = {"_target_": "ddpm_lightning.diffusion.schedules.scaled_linear", **beta, "beta_start": c["beta_start"], "beta_end": c["beta_end"]}
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        schedule = {"_target_": "ddpm_lightning.diffusion.schedules.cosine", **beta, "s": 0.008, "max_beta": 0.999}
    else:
        schedule = {}
        problems.append(f"beta_schedule={c['beta_schedule']!r}: one of {sorted(set(SCHEDULES.values()))}")
    if c["trained_betas"] is not None:
        problems.append("trained_betas: explicit betas are not supported (use a named beta_schedule)")
    if c["variance_type"] not in VARIANCES:
        problems.append(f"variance_type={c['variance_type']!r}: one of {list(VARIANCES)} (learned variances are not supported)")
    if c["prediction_type"] not in PREDICTIONS:
        problems.append(f"prediction_type={c['prediction_type']!r}: one of {list(PREDICTIONS)}")
    if c["thresholding"]:
        problems.append("thresholding=true: dynamic thresholding is not supported")
    if c["rescale_betas_zero_snr"]:
        problems.append("rescale_betas_zero_snr=true: not supported")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        problems.append(f"clip_sample_range={c['clip_sample_range']}: our sampler clips x_0 to [-1, 1]")
    if c["timestep_spacing"] not in DIFFUSERS_SPACINGS:
        problems.append(f"timestep_spacing={c['timestep_spacing']!r}: one of {list(DIFFUSERS_SPACINGS)}")
    elif c["timestep_spacing"] == "leading" and c["steps_offset"] != 0:
        problems.append(f"steps_offset={c['steps_offset']!r}: our leading grid has no offset (0 only)")
    if problems:
        raise UnsupportedConfig("this scheduler config differs from what ddpm_lightning's schedules can express", problems)
    sampler = {
        "_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True,
        "variance": VARIANCES[c["variance_type"]], "clip_denoised": bool(c["clip_sample"]),
        "spacing": c["timestep_spacing"],
    }
    return schedule, PREDICTIONS[c["prediction_type"]], sampler


def diffusers_scheduler_config(schedule: dict, parameterization: str, sampler: dict | None) -> dict:
    """The DDPMScheduler config of our schedule, parameterisation and (DDPM) sampler settings."""
    target = schedule.get("_target_")
    problems = []
    if target not in SCHEDULES:
        problems.append(
            f"schedule._target_={target!r}: diffusers' DDPMScheduler has discrete linear, scaled_linear and "
            f"squaredcos_cap_v2 betas only ({sorted(SCHEDULES)}); NCSN, score-SDE, EDM and rectified-flow schedules "
            "have no equivalent"
        )
    elif target.endswith("cosine") and (schedule.get("s", 0.008), schedule.get("max_beta", 0.999)) != (0.008, 0.999):
        problems.append(f"schedule.s={schedule.get('s')}, schedule.max_beta={schedule.get('max_beta')}: squaredcos_cap_v2 fixes 0.008 and 0.999")
    if parameterization not in PREDICTIONS.values():
        problems.append(
            f"module.parameterization={parameterization!r}: DDPMScheduler's prediction_type is epsilon, v_prediction or "
            "sample; the EDM and flow-matching preconditionings act outside the UNet2DModel and have none"
        )
    if problems:
        raise UnsupportedConfig("this schedule cannot be written as a DDPMScheduler", problems)
    spacing = _export_spacing(sampler)
    sampler = sampler if sampler and str(sampler.get("_target_", "")).endswith(".ddpm") else {}
    out = {
        "num_train_timesteps": int(schedule.get("T", 1000)),
        "beta_schedule": SCHEDULES[target],
        "trained_betas": None,
        "variance_type": sampler.get("variance", "fixed_large"),
        "clip_sample": bool(sampler.get("clip_denoised", True)),
        "clip_sample_range": 1.0,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[parameterization],
        "thresholding": False,
        "timestep_spacing": spacing,
        "steps_offset": 0,
    }
    if target.endswith("linear"):
        defaults = inspect.signature(_import_target(target)).parameters
        out["beta_start"] = float(schedule.get("beta_start", defaults["beta_start"].default))
        out["beta_end"] = float(schedule.get("beta_end", defaults["beta_end"].default))
    return out


def _export_spacing(sampler: dict | None) -> str:
    """diffusers' timestep_spacing for the grid of a (DDPM or DDIM) sampler config: the same name, "uniform" being
    our old name of "leading"; our default (trailing) for other samplers. diffusers has no quadratic grid."""

    target = str((sampler or {}).get("_target_", ""))
    if not target.endswith((".ddpm", ".ddim")):
        return DEFAULT_SPACING
    spacing = discrete_spacing(sampler.get("spacing", DEFAULT_SPACING))
    if spacing not in DIFFUSERS_SPACINGS:
        raise UnsupportedConfig("this sampler cannot be written as a DDPMScheduler",
                                [f"sampler.spacing={spacing!r}: diffusers' timestep_spacing is one of {list(DIFFUSERS_SPACINGS)}"])
    return spacing


def _import_target(target: str):
    module, name = target.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


# ---------------------------------------------------------------------------------------------- weight mapping


def _resnet(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    names = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut"))
    return [(f"{ours}.{a}", f"{theirs}.{b}", "same") for a, b in names]


def module_pairs(net: dict) -> list[tuple[str, str, str]]:
    """(our module path, diffusers module path, kind) for every layer of the U-Net `net` (our model config);
    kind "same" copies weight and bias, "attn" maps a fused 1x1 qkv / proj convolution to to_q, to_k, to_v and
    to_out.0 linear layers, "temb" is the first time-embedding layer (its input halves swap for flip_sin_to_cos)."""
    a = _net_args(net)
    n, nrb, res, attn = len(a["ch_mult"]), a["num_res_blocks"], a["image_size"], set(a["attn_resolutions"])
    pairs = [("down.0.0", "conv_in", "same"), ("temb.0", "time_embedding.linear_1", "temb"), ("temb.2", "time_embedding.linear_2", "same")]
    if a["num_classes"]:
        pairs.append(("label_emb", "class_embedding", "same"))
    u = 1
    for level in range(n):
        for j in range(nrb):
            pairs += _resnet(f"down.{u}.0", f"down_blocks.{level}.resnets.{j}")
            if res in attn:
                pairs.append((f"down.{u}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            u += 1
        if level != n - 1:
            pairs.append((f"down.{u}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            u, res = u + 1, res // 2
    pairs += _resnet("mid.0", "mid_block.resnets.0") + [("mid.1", "mid_block.attentions.0", "attn")]
    pairs += _resnet("mid.2", "mid_block.resnets.1")
    u = 0
    for b, level in enumerate(reversed(range(n))):
        for j in range(nrb + 1):
            pairs += _resnet(f"up.{u}.0", f"up_blocks.{b}.resnets.{j}")
            k = 1
            if res in attn:
                pairs.append((f"up.{u}.1", f"up_blocks.{b}.attentions.{j}", "attn"))
                k = 2
            if level != 0 and j == nrb:
                pairs.append((f"up.{u}.{k}.conv", f"up_blocks.{b}.upsamplers.0.conv", "same"))
            u += 1
        res *= 2
    return pairs + [("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]


_ATTN_NAMES = (("to_q", "to_k", "to_v", "to_out.0"), ("query", "key", "value", "proj_attn"))  # current, before 0.14


def state_dict_from_diffusers(state: dict[str, Tensor], net: dict, flip_sin_to_cos: bool = False) -> dict[str, Tensor]:
    """Our U-Net's state dict from a UNet2DModel state dict (either attention naming); raises naming every
    parameter left unmatched on either side."""
    out, used = {}, set()

    def take(key: str) -> Tensor | None:
        if key in state:
            used.add(key)
            return state[key]
        return None

    for ours, theirs, kind in module_pairs(net):
        if kind == "attn":
            names = next((n for n in _ATTN_NAMES if f"{theirs}.{n[0]}.weight" in state), _ATTN_NAMES[0])
            q, k, v, o = (take(f"{theirs}.{n}.weight") for n in names)
            qb, kb, vb, ob = (take(f"{theirs}.{n}.bias") for n in names)
            for name in ("weight", "bias"):
                if (w := take(f"{theirs}.group_norm.{name}")) is not None:
                    out[f"{ours}.norm.{name}"] = w
            if None in (q, k, v, o, qb, kb, vb, ob):
                continue  # reported as missing below
            c = q.shape[0]
            out[f"{ours}.qkv.weight"] = torch.cat([q, k, v]).reshape(3 * c, -1, 1, 1)
            out[f"{ours}.qkv.bias"] = torch.cat([qb, kb, vb])
            out[f"{ours}.proj.weight"] = o.reshape(c, -1, 1, 1)
            out[f"{ours}.proj.bias"] = ob
            continue
        for name in ("weight", "bias"):
            w = take(f"{theirs}.{name}")
            if w is None:
                continue
            if kind == "temb" and name == "weight" and flip_sin_to_cos:  # diffusers' [cos, sin] -> our [sin, cos]
                half = w.shape[1] // 2
                w = torch.cat([w[:, half : 2 * half], w[:, :half], w[:, 2 * half :]], 1)
            out[f"{ours}.{name}"] = w
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{len(unused)} UNet2DModel parameters have no place in our U-Net: {unused[:8]}")
    return out


def state_dict_to_diffusers(state: dict[str, Tensor], net: dict) -> dict[str, Tensor]:
    """A UNet2DModel state dict (current attention names, contiguous tensors) from our U-Net's state dict."""
    out = {}
    for ours, theirs, kind in module_pairs(net):
        if kind == "attn":
            q, k, v = state[f"{ours}.qkv.weight"].flatten(1).chunk(3)
            qb, kb, vb = state[f"{ours}.qkv.bias"].chunk(3)
            parts = {"to_q": (q, qb), "to_k": (k, kb), "to_v": (v, vb), "to_out.0": (state[f"{ours}.proj.weight"].flatten(1), state[f"{ours}.proj.bias"])}
            parts["group_norm"] = (state[f"{ours}.norm.weight"], state[f"{ours}.norm.bias"])
            for name, (w, b) in parts.items():
                out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = w, b
            continue
        for name in ("weight", "bias"):
            if f"{ours}.{name}" in state:
                out[f"{theirs}.{name}"] = state[f"{ours}.{name}"]
    return {k: v.contiguous() for k, v in out.items()}


def load_net_state(net_module: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into our U-Net after checking names and shapes, naming every mismatch."""
    check_state(net_module.state_dict(), state, source)
    net_module.load_state_dict(state)


def check_state(own: dict[str, Tensor], state: dict[str, Tensor], source: str) -> None:
    """Refuse a state dict whose names or shapes differ from the model's, naming every mismatch."""
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: file has {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"{source}: the weights do not fit the model its config.json describes:\n  " + "\n  ".join(problems[:20]))


# ---------------------------------------------------------------------------------------------- folders


def resolve(source: str | Path) -> Path:
    """A local folder, or a Hugging Face Hub id (e.g. google/ddpm-cifar10-32) downloaded by huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"init_from={source}: no such folder (a diffusers UNet2DModel or DDPMPipeline folder)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except ImportError as e:
        raise ImportError(f"init_from={source}: a Hub id needs huggingface_hub: {EXTRA}") from e
    except Exception as e:  # offline, unknown repository, gated: say what to pass instead
        raise FileNotFoundError(
            f"init_from={source}: not a local folder, and the Hugging Face Hub could not provide it ({type(e).__name__}: {e}). "
            f"Where the network allows, download it (hf download {source} --local-dir <folder>, the huggingface_hub CLI) and pass "
            "init_from=<folder>: a DDPMPipeline folder (model_index.json, unet/, scheduler/) or a UNet2DModel folder "
            "(config.json, diffusion_pytorch_model.safetensors)."
        ) from e


def read_state(folder: Path) -> dict[str, Tensor]:
    """The weights of a UNet2DModel folder: .safetensors (safetensors) or .bin (torch.load, weights_only)."""

    st, bin_ = (folder / name for name in WEIGHT_FILES)
    if st.is_file():
        return _require("safetensors.torch").load_file(str(st))
    if bin_.is_file():
        state = load_file(bin_, "init_from", what="weights file")
        if not isinstance(state, dict):
            raise ValueError(f"{bin_} holds no state dict")
        return state
    raise FileNotFoundError(f"{folder}: no weights file; expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")


def weights_file(source: str | Path) -> Path:
    """The weights file of a diffusers folder or Hub id (what evaluation fingerprints)."""
    unet_dir, _ = _folders(resolve(source))
    found = [unet_dir / name for name in WEIGHT_FILES if (unet_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{unet_dir}: no weights file; expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")
    return found[0]


def _read_json(path: Path) -> dict:
    """A JSON object as plain data: parsed by `json`, never by OmegaConf; a value holding an interpolation
    (`${...}`) is refused (registry.check_plain), naming the file and the key."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
    registry.check_plain(config, str(path))
    return config


def _folders(root: Path) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler config file or None) of a DDPMPipeline folder, a UNet2DModel folder, or a pipeline's unet/."""
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        unet = index.get("unet", [None, "UNet2DModel"])
        if unet[-1] != "UNet2DModel":
            raise UnsupportedConfig(f"{root / 'model_index.json'}", [f"unet is {unet[-1]!r}: only UNet2DModel is supported"])
        return root / "unet", root / "scheduler" / "scheduler_config.json"
    if (root / "config.json").is_file():
        candidates = [root / "scheduler_config.json"] + ([root.parent / "scheduler" / "scheduler_config.json"] if root.name == "unet" else [])
        return root, next((c for c in candidates if c.is_file()), None)
    raise FileNotFoundError(
        f"{root}: neither a DDPMPipeline folder (model_index.json, unet/, scheduler/) nor a UNet2DModel folder (config.json)"
    )


def import_config(source: str | Path, null_label: bool | None = None) -> tuple[dict, Path]:
    """The module hyperparameters (net, schedule, sampler, parameterization, image_size, channels) of a diffusers
    folder or Hub id, and its UNet folder. Reads only the JSON files: every refusal comes before any weights load.
    `null_label`: whether a class-conditional UNet's last class row is the null label (needed only for one)."""
    root = resolve(source)
    unet_dir, scheduler_file = _folders(root)
    unet_config = _read_json(unet_dir / "config.json")
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{unet_dir}: no weights file; expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")
    problems = []
    try:
        net = net_config_from_diffusers(unet_config, null_label)
    except UnsupportedConfig as e:
        net, problems = None, [f"unet: {p}" for p in e.problems]
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:  # a value of the wrong type or range
        raise ValueError(f"{unet_dir / 'config.json'}: not a UNet2DModel config this package can read ({type(e).__name__}: {e})") from None
    if scheduler_file is None:
        warnings.warn(f"{root} has no scheduler config; assuming DDPMScheduler's defaults", stacklevel=2)
        scheduler_config = {}
    else:
        scheduler_config = _read_json(scheduler_file)
    try:
        schedule, parameterization, sampler = schedule_from_diffusers(scheduler_config)
    except UnsupportedConfig as e:
        problems += [f"scheduler: {p}" for p in e.problems]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{scheduler_file}: not a DDPMScheduler config this package can read ({type(e).__name__}: {e})") from None
    if problems:
        raise UnsupportedConfig(f"{root} cannot be imported; what differs from this package's U-Net and schedules", problems)
    # the mapped configs are stored configs like a checkpoint's: every value of its constructor's type
    registry.check(net, "net", str(unet_dir / "config.json"), "unet")
    registry.check(schedule, "schedule", str(scheduler_file or root), "scheduler")
    registry.check(sampler, "sampler", str(scheduler_file or root), "scheduler")
    flip = bool({**UNET_DEFAULTS, **unet_config}["flip_sin_to_cos"])
    hparams = {
        "net": net, "schedule": schedule, "sampler": sampler, "parameterization": parameterization,
        "image_size": net["image_size"], "channels": net["in_channels"], "flip_sin_to_cos": flip,
    }
    return hparams, unet_dir


def _build_net(net: dict) -> torch.nn.Module:
    return registry.build(net, "net", where="unet")


def import_net_state(source: str | Path, net: dict, unet_dir: Path, flip_sin_to_cos: bool) -> dict[str, Tensor]:
    """Our U-Net's state dict from the folder's weights file."""
    try:
        return state_dict_from_diffusers(read_state(unet_dir), net, flip_sin_to_cos)
    except ValueError as e:
        raise ValueError(f"init_from={source}: {e}") from None


def load_module(source: str | Path, null_label: bool | None = None, **module_kwargs: Any):
    """A DiffusionModule (eval mode) with the weights and schedule of a diffusers folder or Hub id; `null_label` as
    for `import_config`."""

    hp, unet_dir = import_config(source, null_label)
    flip = hp.pop("flip_sin_to_cos")
    if hp["net"].get("null_label") is False:
        module_kwargs.setdefault("p_uncond", 0.0)  # no null label to train towards
    module = DiffusionModule(optimizer=OPTIMIZER, **hp, **module_kwargs)
    load_net_state(module.net, import_net_state(source, hp["net"], unet_dir, flip), str(unet_dir))
    module.global_step_loaded = 0
    return module.eval()


# ---------------------------------------------------------------------------------------------- train / evaluate hooks

_TRAINING_ONLY = ("dropout", "fused_norm", "winograd")  # model keys that do not change the imported function


def _overrides(cfg) -> list:
    """The Hydra command-line overrides of this run (parsed), or [] outside a Hydra run."""

    if not HydraConfig.initialized():
        return []
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def init_train_config(cfg) -> dict:
    """For `train.py init_from=<folder>`: put the imported model, schedule and parameterisation into `cfg` (in
    place, before it is resolved), refusing any command-line override that contradicts the import. Returns the
    state dict to load into the network once it is built (names and shapes already checked)."""

    source = cfg.init_from
    hp, unet_dir = import_config(source, cfg.get("init_null_label"))
    defaults = _unet_defaults()
    derived = {"model": hp["net"], "schedule": hp["schedule"], "module.parameterization": hp["parameterization"]}
    conflicts = []
    for o in _overrides(cfg):
        key = o.key_or_group.lstrip("+~")
        section, _, sub = key.partition(".")
        if key == "module.parameterization":
            if OmegaConf.select(cfg, key) != hp["parameterization"]:
                conflicts.append(f"{key}={OmegaConf.select(cfg, key)!r}: the import's is {hp['parameterization']!r}")
        elif section in ("model", "schedule") and sub not in _TRAINING_ONLY:
            given = OmegaConf.to_container(cfg[section], resolve=True)
            want = derived[section]
            keys = [sub] if sub else sorted((set(given) | set(want)) - set(_TRAINING_ONLY))
            for k in keys:
                g = given.get(k, defaults.get(k) if section == "model" else None)
                if g != want.get(k, defaults.get(k) if section == "model" else None):
                    conflicts.append(f"{section}.{k}: the config has {g!r}, the import has {want.get(k)!r}")
    data_size, data_ch = OmegaConf.select(cfg, "data.image_size"), OmegaConf.select(cfg, "data.channels")
    if data_size is not None and data_size != hp["image_size"]:
        conflicts.append(f"data.image_size={data_size}: the imported model takes {hp['image_size']}x{hp['image_size']} images")
    if data_ch is not None and data_ch != hp["channels"]:
        conflicts.append(f"data.channels={data_ch}: the imported model takes {hp['channels']} channels")
    if conflicts:
        raise ValueError(f"init_from={source} defines the model; these settings contradict it:\n  " + "\n  ".join(conflicts)
                         + "\nDrop them (the model and schedule come from the import); model.dropout and the sampler may be set.")
    state = import_net_state(source, hp["net"], unet_dir, hp["flip_sin_to_cos"])
    with torch.device("meta"):  # shapes only, no memory
        check_state(_build_net(hp["net"]).state_dict(), state, f"init_from={source}")
    keep = {k: cfg.model[k] for k in _TRAINING_ONLY if k in cfg.model}
    explicit = {o.key_or_group.lstrip("+~") for o in _overrides(cfg)}
    with open_dict(cfg):
        cfg.model = {**hp["net"], **{k: v for k, v in keep.items() if k != "dropout" or "model.dropout" in explicit}}
        cfg.schedule = hp["schedule"]
        cfg.module.parameterization = hp["parameterization"]
        if not any(k.split(".")[0] == "sampler" for k in explicit):
            cfg.sampler = hp["sampler"]
    return state


# ---------------------------------------------------------------------------------------------- export


def export(ckpt_path: str | Path, out: str | Path, use_ema: bool = True, unet_only: bool = False) -> Path:
    """Write a checkpoint of ours as a DDPMPipeline folder (model_index.json, unet/, scheduler/), or with
    `unet_only` a UNet2DModel folder; EMA weights unless use_ema=False. Refuses what diffusers cannot express."""

    diffusers = _require("diffusers")
    module = load_model(ckpt_path, use_ema=use_ema)
    hp = module.hparams
    problems = []
    try:
        unet_config = diffusers_unet_config(hp["net"])
    except UnsupportedConfig as e:
        problems += e.problems
    scheduler_config = None
    if not unet_only:
        try:
            scheduler_config = diffusers_scheduler_config(hp["schedule"], hp.get("parameterization", "eps"), hp.get("sampler"))
        except UnsupportedConfig as e:
            problems += e.problems
    if problems:
        raise UnsupportedConfig(f"{ckpt_path} cannot be written as a diffusers {'UNet2DModel' if unet_only else 'DDPMPipeline'}", problems)
    unet = diffusers.UNet2DModel(**unet_config)
    unet.load_state_dict(state_dict_to_diffusers(module.net.state_dict(), hp["net"]))
    out = Path(out)
    if unet_only:
        unet.save_pretrained(out)
    else:
        scheduler = diffusers.DDPMScheduler(**scheduler_config)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_lightning.interop.diffusers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a checkpoint as a diffusers DDPMPipeline (or UNet2DModel) folder")
    e.add_argument("ckpt", help="a ddpm-lightning checkpoint (.ckpt)")
    e.add_argument("out", help="the folder to write")
    e.add_argument("--raw", action="store_true", help="the raw trained weights instead of the EMA weights")
    e.add_argument("--unet-only", action="store_true", help="a bare UNet2DModel folder (config.json + weights)")
    args = parser.parse_args(argv)
    out = export(args.ckpt, args.out, use_ema=not args.raw, unet_only=args.unet_only)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
