"""Stored configs are data: the constructors a checkpoint, a run's config.yaml or an imported config may name.

A config read back from a file (checkpoint hyper-parameters, a run's `config.yaml`, a diffusers JSON mapped by
`interop`) is never given to Hydra or OmegaConf. It is built here, by `build(node, kind)`:

- its `_target_` must be one of the model-part constructors listed in `REGISTRY` under that kind (a network's
  config can only name a network, a sampler's only a sampler, ...); nothing with side effects is listed;
- each argument must be a parameter of the constructor and match its annotation (numbers, strings, booleans,
  None, lists of them); a nested config is allowed only where the entry declares one (a ControlNet's base network);
- no string anywhere may contain `${` (an OmegaConf interpolation), and the tree is at most `MAX_DEPTH` deep and
  holds at most `MAX_NODES` values;
- arguments an entry fixes for stored configs are forced (a data module named by a stored config never downloads).

Anything else is refused with a ValueError naming the file and the key, before anything is built. Constructors are
called directly: no `hydra.utils.instantiate`, so no interpolation is ever resolved. Configs written by the user
(conf/, the command line) name the same constructors and are built the same way by the LightningModules.
"""

from __future__ import annotations

import collections.abc
import functools
import importlib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_DEPTH = 16  # nesting of dicts and lists in a stored config
MAX_NODES = 100_000  # values in a stored config
SPECIAL_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")


@dataclass(frozen=True)
class Entry:
    """One constructor a stored config may name. `path`: "module:attribute" (imported when first built);
    `partial`: built as functools.partial (samplers, optimisers: the rest of their arguments come later);
    `nested`: parameter -> the kind of the config it holds, built first and passed as an object;
    `configs`: parameter -> the kind of the config it holds, checked and passed on as a config (modules);
    `stored`: arguments forced when the config comes from a file."""

    kind: str
    path: str
    partial: bool = False
    nested: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    stored: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Any:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)


def _entries(kind: str, module: str, names: tuple[str, ...], aliases: tuple[str, ...] = (), **options: Any) -> dict[str, Entry]:
    """`<alias>.<name>` for each alias module (the public re-exports configs use) and for `module` itself."""
    out = {}
    for name in names:
        entry = Entry(kind, f"{module}:{name}", **options)
        for prefix in (module, *aliases):
            out[f"{prefix}.{name}"] = entry
    return out


_D = "ddpm_lightning.diffusion"
_SAMPLERS = {  # module -> sampler functions (all also reachable as <package>.<name>)
    f"{_D}.samplers.ddpm": ("ddpm", "ddim"),
    f"{_D}.samplers.karras": ("dpmpp_2m", "heun", "euler", "euler_ancestral"),
    f"{_D}.samplers.score": ("ald", "pc", "ode"),
}
_DATA = {
    "ddpm_lightning.data.digits": ("DigitsDataModule",),
    "ddpm_lightning.data.cifar10": ("CIFAR10DataModule",),
    "ddpm_lightning.data.celeba": ("CelebADataModule",),
    "ddpm_lightning.data.image_folder": ("ImageFolderDataModule",),
    "ddpm_lightning.data.toy": ("ToyDataModule",),
}
_DOWNLOADS = ("CIFAR10DataModule", "CelebADataModule")  # data modules that can fetch files: never from a stored config
_MODULE_CONFIGS = {"net": "net", "schedule": "schedule", "sampler": "sampler", "optimizer": "optimizer"}


def _old(module: str) -> str:
    """Where a module of ddpm_lightning.diffusion lived before the package had layers (checkpoints name it so)."""
    return module.replace(f"{_D}.", "ddpm_lightning.")


# The reviewed list: every `_target_` a stored config may name, by kind, under today's module paths and under the
# paths checkpoints written before the package had layers name (ddpm_lightning.schedules.linear, ...).
REGISTRY: dict[str, Entry] = {
    **_entries("net", "ddpm_lightning.nets.unet", ("UNet",), ("ddpm_lightning.nets",)),
    **_entries("net", "ddpm_lightning.nets.mlp", ("MLP",), ("ddpm_lightning.nets",)),
    **_entries("net", "ddpm_lightning.nets.classifier", ("EncoderClassifier",), ("ddpm_lightning.nets",)),
    **_entries("net", "ddpm_lightning.nets.controlnet", ("ControlledUNet",), nested={"base": "net", "condition": "condition"}),
    **_entries("schedule", f"{_D}.schedules", ("linear", "cosine", "scaled_linear", "ncsn", "NCSNSchedule", "VPSDE", "SubVPSDE", "VESDE",
                                                   "EDMSchedule", "RectifiedFlow"),
               (_old(f"{_D}.schedules"),)),
    **{k: v for module, names in _SAMPLERS.items()
       for k, v in _entries("sampler", module, names, (f"{_D}.samplers", _old(module), _old(f"{_D}.samplers")), partial=True).items()},
    **_entries("condition", "ddpm_lightning.control.conditions", ("LowRes", "Edges", "Mask"), ("ddpm_lightning.conditions",)),
    **{k: v for module, names in _DATA.items() for name in names
       for k, v in _entries("data", module, (name,), ("ddpm_lightning.data",), stored={"download": False} if name in _DOWNLOADS else {}).items()},
    **_entries("optimizer", "torch.optim", ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"), partial=True),
    # LightningModules: never named by a stored config; their stored hyper-parameters are checked against them.
    **_entries("module", "ddpm_lightning.training.module", ("DiffusionModule",), configs=_MODULE_CONFIGS),
    **_entries("module", "ddpm_lightning.training.classifier_module", ("NoisyClassifierModule",), configs=_MODULE_CONFIGS),
}
KINDS = tuple(sorted({e.kind for e in REGISTRY.values()}))
_KIND_NAMES = {"net": "network", "data": "data module", "module": "LightningModule"}


def register(name: str, kind: str, path: str, **options: Any) -> None:
    """Let stored configs name one more constructor of a model part (e.g. your own network:
    `register("mypkg.nets.MyNet", "net", "mypkg.nets:MyNet")`), from your own code, before building or loading.
    Only what the user's code registers is added; a file can never register anything."""
    if kind not in KINDS or kind == "module":
        raise ValueError(f"kind={kind!r} must be one of {[k for k in KINDS if k != 'module']}")
    REGISTRY[name] = Entry(kind, path, **options)


def lookup(target: Any, kind: str, where: str = "_target_", source: str = "config") -> Entry:
    """The entry `target` names, which must be of `kind`; else a ValueError naming the source and key."""
    entry = REGISTRY.get(target) if isinstance(target, str) else None
    if entry is None or entry.kind != kind:
        names = sorted(k for k, e in REGISTRY.items() if e.kind == kind)
        raise ValueError(
            f"{source}: {where}={target!r} is not a {_KIND_NAMES.get(kind, kind)} this package can build from a stored config "
            f"(one of: {', '.join(names)}). Nothing was built from it."
        )
    return entry


# ---------------------------------------------------------------------------------------------- plain data


def check_plain(tree: Any, source: str, where: str = "") -> None:
    """Refuse what is not plain data (dicts with string keys, lists, str, int, float, bool, None), a string with an
    OmegaConf interpolation `${`, and trees deeper than MAX_DEPTH or larger than MAX_NODES."""
    count = 0
    stack = [(tree, where, 0)]
    while stack:
        node, key, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ValueError(f"{source}: more than {MAX_NODES} values; a stored config is refused above that size")
        if depth > MAX_DEPTH:
            raise ValueError(f"{source}: {key or 'the config'} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ValueError(f"{source}: {key or 'the config'} has a key {k!r} that is not a string")
                stack.append((v, f"{key}.{k}" if key else k, depth + 1))
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str):
            if "${" in node:
                raise ValueError(
                    f"{source}: {key}={node!r} holds an interpolation (${{...}}); configs read from files are data "
                    "and are never resolved"
                )
        elif node is not None and not isinstance(node, (bool, int, float)):
            raise ValueError(f"{source}: {key}={type(node).__name__} is not plain data (str, number, bool, null, list, dict)")


def targets(tree: Any) -> list[str]:
    """Every `_target_` value anywhere in a plain tree."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "_target_" in node:
                found.append(node["_target_"])
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return found


def check_names(tree: Any, source: str, where: str = "") -> None:
    """Plain data (`check_plain`) whose every `_target_` is a registered constructor: the first look at a file's
    configs, before anything is read from them."""
    check_plain(tree, source, where)
    for target in targets(tree):
        if not isinstance(target, str) or target not in REGISTRY or REGISTRY[target].kind == "module":
            raise ValueError(
                f"{source} names _target_ {target!r}, which is not allowed: a stored config may only name the "
                "constructors of model parts listed in ddpm_lightning.registry. Nothing was built from it."
            )


# ---------------------------------------------------------------------------------------------- types


def _is_sequence(origin: Any) -> bool:
    return origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence, typing.Sequence)


def conforms(value: Any, hint: Any) -> bool:
    """Whether plain `value` fits the annotation `hint` (int, float, bool, str / Path, None, their unions, and
    sequences of them); any other annotation admits no stored value."""
    if hint is typing.Any:
        return not isinstance(value, dict) and (not isinstance(value, (list, tuple)) or all(not isinstance(v, (dict, list, tuple)) for v in value))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if _is_sequence(origin) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        item = args[0] if args else typing.Any
        return all(not isinstance(v, (dict, list, tuple)) and conforms(v, item) for v in value)
    return False


def describe(hint: Any) -> str:
    """An annotation as a user reads it: 'int', 'float or null', 'list of int'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is None or hint is type(None):
        return "null"
    if _is_sequence(origin):
        return f"list of {describe(args[0])}" if args else "list"
    if hint in (Path, os.PathLike):
        return "str"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


@functools.cache
def _signature(path: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The constructor's parameters and their resolved annotations (empty where they cannot be resolved)."""
    target = Entry("", path).resolve()
    function = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(target).parameters)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - an annotation naming what is not importable: values are then checked as plain data only
        hints = {}
    return params, hints


def check_arguments(entry: Entry, node: dict, source: str, where: str) -> dict:
    """`node`'s arguments (special keys removed), each a parameter of the entry's constructor with a value of its
    annotated type; nested configs where the entry declares them, checked recursively."""
    params, hints = _signature(entry.path)
    for key in node:
        if key.startswith("_") and key not in SPECIAL_KEYS:
            raise ValueError(f"{source}: {where}.{key}: unknown special key (only {', '.join(SPECIAL_KEYS)})")
    partial = node.get("_partial_", entry.partial)
    if not isinstance(partial, bool) or partial != entry.partial:
        raise ValueError(f"{source}: {where}._partial_={partial!r}: {entry.path.replace(':', '.')} is built with _partial_={entry.partial}")
    args = {k: v for k, v in node.items() if k not in SPECIAL_KEYS}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in args.items():
        if key not in named:
            raise ValueError(f"{source}: {where}.{key}: {entry.path.replace(':', '.')} has no parameter {key!r}")
        kind = entry.nested.get(key) or entry.configs.get(key)
        if kind is not None:
            if value is not None or params[key].default is not None:
                check(value, kind, source, f"{where}.{key}")
            continue
        hint = hints.get(key, typing.Any)
        if not conforms(value, hint) or isinstance(value, dict):
            raise ValueError(f"{source}: {where}.{key}={value!r} must be {describe(hint)}")
    if not entry.partial:
        missing = [n for n, p in params.items() if n in named and p.default is p.empty and n not in args]
        if missing:
            raise ValueError(f"{source}: {where} lacks {', '.join(missing)} (needed by {entry.path.replace(':', '.')})")
    return args


def check(node: Any, kind: str, source: str = "config", where: str = "") -> Entry:
    """Refuse a config that `build` would refuse, building nothing; returns its entry."""
    where = where or kind
    check_plain(node, source, where)
    if not isinstance(node, dict):
        raise ValueError(f"{source}: {where} must be a config with a _target_, got {type(node).__name__}")
    entry = lookup(node.get("_target_"), kind, f"{where}._target_", source)
    check_arguments(entry, node, source, where)
    return entry


def build(node: Any, kind: str, source: str = "config", where: str = "", stored: bool = True) -> Any:
    """The object a plain config describes, through its registered constructor (a functools.partial for samplers
    and optimisers). `stored`: the config comes from a file, so the entry's `stored` arguments are forced."""
    where = where or kind
    entry = check(node, kind, source, where)
    kwargs = {}
    for key, value in node.items():
        if key in SPECIAL_KEYS:
            continue
        sub = entry.nested.get(key)
        kwargs[key] = build(value, sub, source, f"{where}.{key}", stored) if sub and value is not None else value
    if stored:
        kwargs.update(entry.stored)
    constructor = entry.resolve()
    return functools.partial(constructor, **kwargs) if entry.partial else constructor(**kwargs)


def check_module(constructor: Any, hparams: Any, source: str, where: str = "hyper_parameters") -> None:
    """Refuse stored LightningModule hyper-parameters (a checkpoint's) that do not fit `constructor`: every
    argument type-checked, every nested config (net, schedule, sampler, optimizer) checked against its kind."""
    name = f"{constructor.__module__}.{constructor.__qualname__}"
    check_plain(hparams, source, where)
    if not isinstance(hparams, dict):
        raise ValueError(f"{source}: {where} must be a dict of the model's settings")
    check_arguments(lookup(name, "module", where, source), hparams, source, where)
