"""Evaluate a checkpoint: `python evaluate.py ckpt_path=<ckpt> [overrides]` (see README.md, "Evaluation")."""

import sys

import hydra
from omegaconf import DictConfig

from ddpm_lightning.evaluation import check_overrides
from ddpm_lightning.tasks import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"Error: {e}")
    main()
