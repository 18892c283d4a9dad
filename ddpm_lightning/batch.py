"""The batch as one dict, {"x": images or points, "y": class labels or None}, whatever form a data module yields
((image, label) pairs, bare tensors, dicts): `unpack` is the one place that reads a batch or an example."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def unpack(batch: Any) -> dict[str, Any]:
    """{"x": ..., "y": ..., **other keys} of a batch or of one example: a dict passes (y defaulting to None), a
    pair (x, y) or list maps to x and y, anything else is x alone."""
    if isinstance(batch, Mapping):
        return {"y": None, **batch}
    if isinstance(batch, (list, tuple)):
        return {"x": batch[0], "y": batch[1] if len(batch) > 1 else None}
    return {"x": batch, "y": None}
