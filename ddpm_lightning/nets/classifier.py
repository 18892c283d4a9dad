"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021 §4): the U-Net's encoder half
(input convolution, down blocks, middle block, all taking the time embedding) with a pooled linear head,
giving logits of p(y | x_t, t)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ddpm_lightning.nets.unet import UNet, check_input, timestep_embedding


class EncoderClassifier(nn.Module):
    """`forward(x_t, t)` -> logits [B, num_classes]. The encoder is the one of a `UNet` of the same arguments
    (its modules are taken over, so the architecture is written once); the head is GroupNorm, SiLU, global
    average pooling and a linear layer (ADM's classifiers pool with attention; mean pooling is enough here)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        norm_groups: int = 32,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes!r} must be an integer of at least 2")
        unet = UNet(in_channels, None, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, None, norm_groups)
        self.in_channels, self.image_size, self.ch, self.num_classes = in_channels, image_size, ch, num_classes
        self.temb, self.down, self.mid = unet.temb, unet.down, unet.mid
        cur = ch * tuple(ch_mult)[-1]
        self.head = nn.Sequential(
            nn.GroupNorm(norm_groups, cur), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cur, num_classes)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        check_input(x, self.in_channels, self.image_size, "classifier")
        temb = self.temb(timestep_embedding(t.expand(x.shape[0]), self.ch))
        h = x
        for unit in self.down:
            h = unit(h, temb)
        return self.head(self.mid(h, temb))
