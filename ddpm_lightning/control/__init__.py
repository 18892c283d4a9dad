"""ControlNet (Zhang et al. 2023): the LightningModule trained on top of a base checkpoint, its condition
operators, sample grids and evaluation conditions. The network itself is nets/controlnet.py."""
