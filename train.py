"""Train a diffusion model: `python train.py [hydra overrides]` (see README.md)."""

import hydra
from omegaconf import DictConfig

from ddpm_lightning.tasks import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
