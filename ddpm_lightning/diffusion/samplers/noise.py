"""Per-sample random streams: the same seed gives the same image whatever the batch
size or the number of processes (as NVlabs/edm's StackedRandomGenerator)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PerSampleNoise:
    """One torch.Generator per sample, seeded with that sample's seed."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """A [len(seeds), *shape] standard normal tensor, row i drawn from seed i."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.dtype)
