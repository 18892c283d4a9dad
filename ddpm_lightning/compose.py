"""Building from the user's config: settings of one group that depend on another (the U-Net's attention
resolutions on the data's image size) are adjusted here, with a logged note, before anything is built; `build`
instantiates a config node (Hydra), its values type-checked against the target's annotations first."""

from __future__ import annotations

import logging
import platform
import types
import typing
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def fit_attention(attn_resolutions: list[int], image_size: int, levels: int) -> list[int]:
    """Attention resolutions a U-Net of `levels` levels reaches at `image_size` (resolutions image_size,
    image_size / 2, ..., image_size / 2^(levels - 1)): a resolution above the image is moved to the image's
    own, one below the lowest level to the lowest level (the papers place attention at 16x16 whatever the image
    size: Ho et al. 2020 App. B, Song et al. 2021 DDIM's CelebA 64; a model config made for another size keeps
    the nearest meaning). A resolution between two levels is left as it is: it is a contradiction, which the
    U-Net reports."""
    reached = [image_size // 2**i for i in range(levels)]
    fitted: list[int] = []
    for r in attn_resolutions:
        r = reached[0] if r > reached[0] else reached[-1] if r < reached[-1] else r
        if r not in fitted:
            fitted.append(r)
    return fitted


def fit_model_to_data(cfg: DictConfig) -> None:
    """Adjust `cfg.model` (in place, before it is resolved into the module's config) to `cfg.data`, logging each
    change. Only settings that are a matter of scale change; a contradiction is left for the model's check."""
    model = cfg.get("model")
    if model is None or "attn_resolutions" not in model or "ch_mult" not in model or "image_size" not in model:
        return
    size, levels, attn = int(model.image_size), len(model.ch_mult), [int(r) for r in model.attn_resolutions]
    if size < 1 or size % 2 ** (levels - 1):
        return  # the U-Net names the divisibility it needs
    fitted = fit_attention(attn, size, levels)
    if fitted != attn:
        reached = [size // 2**i for i in range(levels)]
        log.info(
            "model.attn_resolutions=%s adjusted to %s: at image_size %d the U-Net's %d levels have resolutions %s "
            "(set model.attn_resolutions to some of these to choose)", attn, fitted, size, levels, reached,
        )
        with open_dict(model):
            model.attn_resolutions = fitted


def auto_precision(accelerator: str, cuda: bool | None = None, bf16: bool | None = None) -> str:
    """`trainer.precision=auto`: bf16-mixed on a GPU that computes in bf16 (Ampere and later), else 32-true (on a CPU
    bf16 autocast pays only on some CPUs and changes the numbers, so it stays a choice: trainer.precision=bf16-mixed)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if accelerator not in ("auto", "gpu", "cuda") or not cuda:
        return "32-true"
    bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    return "bf16-mixed" if bf16 else "32-true"


def cpu_native_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively: on x86, avx512_bf16 or AMX, as torch's own CPU-feature queries
    report them (the ones its oneDNN kernels go by). None where that cannot be told (another architecture, or a
    torch without these queries)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return None
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is None or amx is None:
        return None
    return bool(avx512_bf16() or amx())


def warn_slow_bf16(trainer: DictConfig) -> None:
    """An explicit bf16 precision on a CPU without native bf16 (AVX2 only): bf16 is emulated there, several times
    slower than fp32 (which `auto` picks on a CPU); say so in one line, naming the faster setting, and run as asked."""
    precision = str(trainer.get("precision"))
    accelerator = str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and cpu_native_bf16() is False:
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (no avx512_bf16, no AMX): bf16 is emulated there and "
            "trains several times slower than fp32; trainer.precision=32-true (or auto) is faster on this machine",
            precision,
        )


def resolve_precision(trainer: DictConfig) -> None:
    """Replace `precision: auto` (the default) in a trainer config by what `auto_precision` picks, logging it; warn
    about an explicit bf16 precision on a CPU that only emulates it (`warn_slow_bf16`)."""
    if trainer.get("precision") == "auto":
        picked = auto_precision(str(trainer.get("accelerator", "auto")))
        log.info("trainer.precision=auto: %s", picked)
        with open_dict(trainer):
            trainer.precision = picked
    else:
        warn_slow_bf16(trainer)


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """The isinstance() types a value annotated `hint` may have, for int / float / bool / str and their `| None`;
    None for any other annotation (not checked)."""
    if hint in (int, float, bool, str):
        return {int: (int,), float: (int, float), bool: (bool,), str: (str,)}[hint]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        parts = [_simple_types(a) if a is not type(None) else (type(None),) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    return None


def check_types(node: DictConfig) -> None:
    """Refuse a config value whose type contradicts its parameter's annotation (e.g. data.batch_size=abc, which
    would fail later as a bare TypeError), naming the key and the expected type."""
    try:
        target = get_object(node["_target_"])
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # noqa: BLE001 - an unresolvable target or annotation: instantiate reports it
        return
    prefix = node._get_full_key(None) or "config"
    for key, value in node.items():
        allowed = _simple_types(hints.get(key))
        if allowed is None or isinstance(key, str) and key.startswith("_"):
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{prefix}.{key}={value!r} must be {names}")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising a config error (ValueError) as itself rather than wrapped; values of the
    wrong type for the target's annotated parameters are refused first, naming the key."""
    if OmegaConf.is_dict(node) and "_target_" in node:
        check_types(node)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiate calls wrap once per level
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise
