"""Seeds: per-step seeds mixed from integer keys, and each process's share of a sample set."""

from __future__ import annotations

import math

import numpy as np


def step_seed(*keys: int) -> int:
    """A 63-bit seed mixing integer keys (e.g. run seed, epoch, batch index, rank) through numpy's SeedSequence,
    so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rank_share(n: int, world_size: int, rank: int) -> range:
    """The indices of n samples that process `rank` of `world_size` makes: a contiguous block of ceil(n / world_size),
    the same size on every rank so that they can be gathered (the last blocks may reach past n; drop those after
    gathering). Sample i has seed offset + i whatever the number of processes."""
    per_rank = math.ceil(n / world_size)
    return range(rank * per_rank, (rank + 1) * per_rank)
