"""Logger factories used by conf/logger/*.yaml."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def wandb_has_credentials() -> bool:
    """True if an API key is in WANDB_API_KEY or in ~/.netrc (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline (synced later with `wandb sync`) when `offline` is null and no
    credentials are found, or when WANDB_MODE=offline."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_has_credentials()
        if offline:
            rank_zero_info("W&B: no credentials found, logging offline; sync later with `wandb sync <run dir>/wandb`")
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return WandbLogger(offline=offline, **kwargs)
