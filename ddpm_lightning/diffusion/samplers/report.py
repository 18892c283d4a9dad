"""The samplers' callback: callback(k, x) after step k, and callback(k, x, denoised=x0) for a callback that takes
`denoised` (the step's x_0 prediction, None where the step makes none), as k-diffusion's callbacks carry it."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor


def takes_denoised(callback: Callable) -> bool:
    """Whether `callback` accepts a `denoised` keyword (by name or by **kwargs)."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the old two-argument form
        return False
    return any(p.name == "denoised" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def report(callback: Callable | None, k: int, x: Tensor, denoised: Tensor | None = None) -> None:
    """Calls callback(k, x), with denoised=... where the callback takes it."""
    if callback is None:
        return
    if takes_denoised(callback):
        callback(k, x, denoised=denoised)
    else:
        callback(k, x)
