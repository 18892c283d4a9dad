"""Networks: the DDPM U-Net and the pieces built from it."""

from ddpm_lightning.nets.classifier import EncoderClassifier
from ddpm_lightning.nets.unet import UNet

__all__ = ["EncoderClassifier", "UNet"]
