"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of a locked U-Net's encoder (time and label embeddings, input convolution, every down unit)
and middle block, initialised from the base weights. A small condition encoder maps the condition image c_i
to a feature map c_f added after the input convolution (the paper's eq. 2-3, its last layer zero-initialised),
and one zero-initialised 1x1 convolution per skip connection and one for the middle block turn the copy's
features into the residuals the U-Net adds to its skips and middle block (`UNet.forward(control=...)`). At
initialisation every residual is exactly zero, so the controlled model is the base model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ddpm_lightning.nets.unet import UNet, timestep_embedding, zero_init


class ControlNet(nn.Module):
    """`forward(x, t, hint, y=None)` -> the control residuals, one per skip connection of `base` plus one for its
    middle block. The encoder modules are deep copies of the base U-Net's (the architecture is written once)."""

    def __init__(self, base: UNet, hint_channels: int, hint_widths: Sequence[int] = (16, 32)):
        super().__init__()
        self.ch, self.num_classes, self.hint_channels = base.ch, base.num_classes, hint_channels
        self.temb, self.label_emb = copy.deepcopy(base.temb), copy.deepcopy(base.label_emb)
        self.down, self.mid = copy.deepcopy(base.down), copy.deepcopy(base.mid)
        # Condition encoder: 3x3 convolutions with SiLU at the image's resolution (the images here are small, so
        # unlike the paper's 512 -> 64 encoder it does not down-sample), the last one zero-initialised.
        layers, cur = [], hint_channels
        for w in hint_widths:
            layers += [nn.Conv2d(cur, w, 3, padding=1), nn.SiLU()]
            cur = w
        self.hint_encoder = nn.Sequential(*layers, zero_init(nn.Conv2d(cur, base.ch, 3, padding=1)))
        mid_ch = base.skip_channels[-1]
        self.zero_convs = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in (*base.skip_channels, mid_ch))

    def copy_from(self, base: UNet) -> None:
        """Initialise the trainable copy from the base's (trained) weights."""
        for mine, theirs in ((self.temb, base.temb), (self.label_emb, base.label_emb), (self.down, base.down), (self.mid, base.mid)):
            if mine is not None:
                mine.load_state_dict(theirs.state_dict())

    def forward(self, x: Tensor, t: Tensor, hint: Tensor, y: Tensor | None = None) -> list[Tensor]:
        temb = self.temb(timestep_embedding(t.expand(x.shape[0]), self.ch))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.label_emb(y)
        residuals, h = [], x
        for i, unit in enumerate(self.down):
            h = unit(h, temb)
            if i == 0:  # c_f = E(c_i), added to the input convolution's output
                h = h + self.hint_encoder(hint.to(h.dtype))
            residuals.append(self.zero_convs[i](h))
        residuals.append(self.zero_convs[-1](self.mid(h, temb)))
        return residuals


class ControlledUNet(nn.Module):
    """A locked base U-Net steered by a ControlNet: `forward(x, t, y=None, hint=None, conditioning_scale=1.0)`.

    `base` is the built U-Net and `condition` the built condition operator (a stored config names both as nested
    configs, built first by ddpm_lightning.registry). The base is frozen (no gradients, always in eval mode); only
    `control` trains. `conditioning_scale`
    multiplies the residuals: 0 gives the base model exactly, 1 the trained strength. `condition` is the
    operator that makes a condition from an image (ddpm_lightning.control.conditions), kept with the network so a
    loaded model knows what it was trained on. `base_ckpt` and `base_sha256` record where the base weights
    came from; the weights themselves are part of this module's state_dict (checkpoints are self-contained).
    """

    def __init__(
        self,
        base: nn.Module,
        condition: Any,
        hint_widths: Sequence[int] = (16, 32),
        base_ckpt: str | None = None,
        base_sha256: str | None = None,
    ):
        super().__init__()
        if not isinstance(base, UNet):
            raise ValueError(f"a ControlNet needs a U-Net base model, got {type(base).__name__}")
        self.base: UNet = base
        self.condition = condition
        self.image_size, self.in_channels, self.num_classes = self.base.image_size, self.base.in_channels, self.base.num_classes
        self.hint_shape = (self.condition.hint_channels(self.in_channels), self.image_size, self.image_size)
        self.control = ControlNet(self.base, self.hint_shape[0], hint_widths)
        self.base_ckpt, self.base_sha256 = base_ckpt, base_sha256
        self.base.requires_grad_(False).eval()

    def load_base(self, state_dict: Mapping[str, Tensor], source: str = "base_ckpt") -> None:
        """Load the base's weights and initialise the trainable copy from them; a state_dict of another
        architecture is refused, naming `source`."""
        try:
            self.base.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"{source} holds a network of another architecture than its config says: {e}") from None
        self.control.copy_from(self.base)

    def train(self, mode: bool = True) -> ControlledUNet:
        """The base stays in eval mode (dropout off) whatever the mode of the rest."""
        super().train(mode)
        self.base.eval()
        return self

    def check_hint(self, hint: Tensor | None, x: Tensor) -> None:
        """Reject a missing condition or one of the wrong shape, naming what was expected."""
        if hint is None:
            raise ValueError(
                "a ControlNet model needs a condition: sample(..., hint=<[B, C, H, W] tensor>) "
                "(evaluate.py: control.split or control.folder)"
            )
        if tuple(hint.shape[1:]) != self.hint_shape or hint.shape[0] != x.shape[0]:
            raise ValueError(
                f"condition (hint) of shape {tuple(hint.shape)}: this ControlNet ({type(self.condition).__name__}) "
                f"expects [{x.shape[0]}, {', '.join(map(str, self.hint_shape))}]"
            )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, hint: Tensor | None = None, conditioning_scale: float = 1.0) -> Tensor:
        self.check_hint(hint, x)
        if conditioning_scale == 0:
            return self.base(x, t, y)
        control = self.control(x, t, hint, y)
        if conditioning_scale != 1:
            control = [c * conditioning_scale for c in control]
        return self.base(x, t, y, control=control)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the locked base and of the trainable control branch (the seed's "doubling")."""
        return {"base": sum(p.numel() for p in self.base.parameters()), "control": sum(p.numel() for p in self.control.parameters())}



class MultiControlledUNet(nn.Module):
    """Several ControlNets over one locked base (Zhang et al. 2023 Sec. 3.5, "multiple conditions"):
    `forward(x, t, y=None, hint=[h_1, ..., h_N], conditioning_scale=None)` adds sum_i s_i r_i(x, t, h_i) to the
    base's skips and middle block, r_i the residuals of branch i (`ControlNet`) and s_i its conditioning scale.

    `controls` and `conditions` are the branches and their condition operators, in order; `scales` the default
    s_i (`conditioning_scale=None`); a list given to `forward` replaces them, a number scales every branch alike.
    A branch at scale 0 is skipped, so with one branch left the output is, bitwise, that of its `ControlledUNet`
    at its scale, and with all at 0 the base's. The branches must have been trained on this base (the loader,
    `loading.load_controlnets`, checks the recorded `base_sha256`)."""

    def __init__(self, base: UNet, controls: Sequence[ControlNet], conditions: Sequence[Any],
                 scales: Sequence[float] | None = None, base_sha256: str | None = None):
        super().__init__()
        if len(controls) != len(conditions) or not controls:
            raise ValueError("MultiControlledUNet: give one condition operator per ControlNet branch (at least one)")
        self.base: UNet = base
        self.controls = nn.ModuleList(controls)
        self.conditions = list(conditions)
        self.scales = self._scales(1.0 if scales is None else scales)
        self.base_sha256 = base_sha256
        self.image_size, self.in_channels, self.num_classes = base.image_size, base.in_channels, base.num_classes
        self.hint_shapes = [(op.hint_channels(self.in_channels), self.image_size, self.image_size) for op in self.conditions]
        self.requires_grad_(False)
        self.eval()

    def _scales(self, scales: Any) -> list[float]:
        if isinstance(scales, (int, float)) and not isinstance(scales, bool):
            return [float(scales)] * len(self.controls)
        scales = [float(s) for s in scales]
        if len(scales) != len(self.controls):
            raise ValueError(f"control.scale: {len(scales)} conditioning scales for {len(self.controls)} ControlNets; "
                             "give one per ControlNet (or one number for all)")
        return scales

    def check_hint(self, hint: Any, x: Tensor) -> None:
        """Reject anything but one condition of the right shape per branch, naming what was expected."""
        expected = ", ".join(f"[{x.shape[0]}, {', '.join(map(str, s))}]" for s in self.hint_shapes)
        if not isinstance(hint, (list, tuple)) or len(hint) != len(self.controls):
            raise ValueError(f"{len(self.controls)} ControlNets need a list of {len(self.controls)} conditions: "
                             f"sample(..., hint=[...]) of shapes {expected}")
        for h, shape in zip(hint, self.hint_shapes):
            if not isinstance(h, Tensor) or tuple(h.shape[1:]) != shape or h.shape[0] != x.shape[0]:
                raise ValueError(f"conditions (hint) of shapes {[tuple(getattr(h, 'shape', ())) for h in hint]}: "
                                 f"these ControlNets expect {expected}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, hint: Sequence[Tensor] | None = None,
                conditioning_scale: float | Sequence[float] | None = None) -> Tensor:
        self.check_hint(hint, x)
        scales = self.scales if conditioning_scale is None else self._scales(conditioning_scale)
        control = None
        for branch, h, s in zip(self.controls, hint, scales):
            if s == 0:
                continue
            residuals = branch(x, t, h, y)
            if s != 1:
                residuals = [r * s for r in residuals]
            control = residuals if control is None else [a + b for a, b in zip(control, residuals)]
        return self.base(x, t, y) if control is None else self.base(x, t, y, control=control)

    def train(self, mode: bool = True) -> MultiControlledUNet:
        """For sampling only: every part stays in eval mode (dropout off) whatever the mode asked for."""
        return super().train(False)
