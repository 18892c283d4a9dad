"""Networks: the DDPM U-Net and the pieces built from it, and a small MLP for points."""

from ddpm_lightning.nets.classifier import EncoderClassifier
from ddpm_lightning.nets.mlp import MLP
from ddpm_lightning.nets.unet import UNet

__all__ = ["MLP", "EncoderClassifier", "UNet"]
