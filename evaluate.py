"""Evaluate a checkpoint: `python evaluate.py ckpt_path=<ckpt> [overrides]` (see README.md, "Evaluation")."""

import hydra
from omegaconf import DictConfig

from ddpm_lightning.tasks import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
