"""The DDPM U-Net (Ho et al. 2020 App. B; PixelCNN++ backbone with Wide-ResNet blocks).

ResBlocks with GroupNorm and SiLU, a sinusoidal time embedding mapped to 4*ch by an
MLP, single-head self-attention at chosen resolutions, dropout, strided-conv
downsampling and nearest+conv upsampling. With ch=128, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attn_resolutions=(16,) it is the paper's CIFAR-10 model with
35,746,307 parameters.

Optional inputs, not forks: class labels `y` (an embedding added to the time
embedding, with index `num_classes` as the null label for classifier-free
guidance) and additive `control` residuals, one per skip connection plus one for
the middle block (ControlNet).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 1) -> Tensor:
    """Sinusoidal embedding of Vaswani et al. 2017 §3.5, as in Ho et al.'s `get_timestep_embedding`: [sin, cos] of
    t times the frequencies exp(-log(max_period) i / (half - freq_shift)), i < half; Ho et al.'s freq_shift is 1
    (diffusers' default 0 spaces the frequencies by 1 / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def check_input(x: Tensor, in_channels: int, image_size: int, name: str) -> None:
    """Reject an input that is not [B, in_channels, image_size, image_size], naming the config keys."""
    if x.shape[1] != in_channels or x.shape[-1] != image_size or x.shape[-2] != image_size:
        raise ValueError(
            f"{name} built for [B, {in_channels}, {image_size}, {image_size}] inputs "
            f"(model.in_channels, model.image_size) got {tuple(x.shape)}"
        )


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias (Ho et al. initialise the last conv of each block with scale 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block (Ho et al. App. B): GroupNorm, SiLU, 3x3 conv; plus the projected time embedding;
    GroupNorm, SiLU, dropout, 3x3 conv (initialised to zero); plus the input (through a 1x1 conv where the
    channel count changes)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Spatial self-attention with a residual connection: single-head as in Ho et al. App. B, or `heads` heads of
    ch / heads channels each (head h takes channels [h d, (h + 1) d) of q, k and v, scaled by d^-1/2)."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))
        self.heads = heads

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        # [B, 1, HW, C] each; split from a [B, HW, 3, C] view so that on channels-last tensors their gradients
        # stack into a channels-last gradient of qkv's output (the qkv convolution's backward is slow on others)
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1)
        if self.heads == 1:
            q, k, v = qkv.reshape(B, 1, H * W, 3, C).unbind(3)
        else:  # [B, heads, HW, d] each
            q, k, v = qkv.reshape(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        return x + self.proj(h.permute(0, 1, 3, 2).reshape(B, C, H, W))


DOWNSAMPLE_PADDINGS = ("symmetric", "tf_same")


class Downsample(nn.Module):
    """3x3 convolution with stride 2. padding "symmetric": one zero row / column on every side; "tf_same":
    (left, right, top, bottom) = (0, 1, 0, 1), TensorFlow's "SAME" padding for an even size and stride 2, as in
    Ho et al.'s original code (diffusers' `downsample_padding=0`)."""

    def __init__(self, ch: int, padding: str = "symmetric"):
        super().__init__()
        self.tf_same = padding == "tf_same"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.tf_same else 1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.tf_same else x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of blocks that all receive the time embedding."""

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, temb)
        return x


class UNet(nn.Module):
    """The DDPM U-Net. `forward(x, t, y=None, control=None)` returns a tensor shaped like x
    (or with `out_channels` channels; twice as many with `learn_sigma`, the second half being the reverse
    process's variance interpolation v of Nichol & Dhariwal 2021 eq. 15).

    `norm_eps` (GroupNorm's epsilon) and `downsample_padding` express the numerical choices other implementations
    of the same network make: diffusers' google/ddpm-* models use 1e-6 and "tf_same" (see diffusers_io.py).
    `fused_norm` and `winograd` are accepted and ignored: checkpoints written before the CPU kernels became a
    runtime setting (conf `kernels`) carry them."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        num_classes: int | None = None,
        norm_groups: int = 32,
        fused_norm: bool | None = None,
        winograd: bool | None = None,
        learn_sigma: bool = False,
        norm_eps: float = 1e-5,
        downsample_padding: str = "symmetric",
        null_label: bool = True,
        attention_head_dim: int | None = None,
        freq_shift: int = 1,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        _validate(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, norm_groups, num_classes)
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"model.downsample_padding={downsample_padding!r} must be one of {DOWNSAMPLE_PADDINGS}")
        if not norm_eps > 0:
            raise ValueError(f"model.norm_eps={norm_eps} must be positive (GroupNorm's epsilon)")
        _validate_heads(ch, ch_mult, attn_resolutions, image_size, attention_head_dim)
        self.in_channels, self.image_size, self.ch, self.freq_shift = in_channels, image_size, ch, freq_shift
        self.num_classes, self.learn_sigma, self.null_label = num_classes, bool(learn_sigma), bool(null_label)
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        # Class labels 0..num_classes-1; index num_classes is the null label (classifier-free guidance), unless
        # null_label=false (e.g. an imported class-conditional model trained without label dropout).
        self.label_emb = nn.Embedding(num_classes + int(self.null_label), temb_ch) if num_classes else None

        def res(i: int, o: int, resolution: int) -> list[nn.Module]:
            block = [ResBlock(i, o, temb_ch, dropout, norm_groups, norm_eps)]
            return block + [attention(o)] if resolution in attn_resolutions else block

        def attention(channels: int) -> AttnBlock:
            return AttnBlock(channels, norm_groups, norm_eps, channels // (attention_head_dim or channels))

        # Encoder: every unit's output is a skip connection.
        self.down = nn.ModuleList([TimestepSequential(_Conv(in_channels, ch))])
        skip_ch, cur, resolution = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(TimestepSequential(*res(cur, ch * mult, resolution)))
                cur = ch * mult
                skip_ch.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(TimestepSequential(Downsample(cur, downsample_padding)))
                skip_ch.append(cur)
                resolution //= 2
        self.skip_channels = tuple(skip_ch)
        self.mid = TimestepSequential(
            ResBlock(cur, cur, temb_ch, dropout, norm_groups, norm_eps),
            attention(cur),
            ResBlock(cur, cur, temb_ch, dropout, norm_groups, norm_eps),
        )
        # Decoder: every unit consumes one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for j in range(num_res_blocks + 1):
                layers = res(cur + skip_ch.pop(), ch * mult, resolution)
                cur = ch * mult
                if level != 0 and j == num_res_blocks:
                    layers.append(Upsample(cur))
                    resolution *= 2
                self.up.append(TimestepSequential(*layers))
        out_ch = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, cur, norm_eps), nn.SiLU(), zero_init(nn.Conv2d(cur, out_ch, 3, padding=1))
        )
        if fused_norm is False or winograd is False:  # kept in checkpoints' configs from before `kernels`
            warnings.warn("model.fused_norm / model.winograd no longer choose the CPU kernels; set kernels=off (conf/train.yaml) for PyTorch's operators", stacklevel=2)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, control: Sequence[Tensor] | None = None) -> Tensor:
        check_input(x, self.in_channels, self.image_size, "UNet")
        temb = self.temb(timestep_embedding(t.expand(x.shape[0]), self.ch, freq_shift=self.freq_shift))
        if self.label_emb is not None:
            if not self.null_label and (y is None or bool((y == self.num_classes).any())):
                raise ValueError(
                    "this class-conditional model has no null label (model.null_label=false): sample it with class "
                    "labels (labels=[...] or labels=all), without classifier-free guidance or label dropout"
                )
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("class labels given to a UNet built without model.num_classes")
        hs = []
        h = x
        for unit in self.down:
            h = unit(h, temb)
            hs.append(h)
        h = self.mid(h, temb)
        if control is not None:
            # ControlNet (Zhang et al. 2023): residuals added to every skip and to the middle block.
            hs = [s + c for s, c in zip(hs, control[:-1], strict=True)]
            h = h + control[-1]
        for unit in self.up:
            h = unit(torch.cat([h, hs.pop()], dim=1), temb)
        return self.out(h)


class _Conv(nn.Conv2d):
    """The input 3x3 convolution, taking (and ignoring) the time embedding."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return super().forward(x)


def _validate(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, norm_groups, num_classes) -> None:
    """Reject a U-Net configuration that cannot work, naming the config key."""
    if not ch_mult or any(int(m) < 1 for m in ch_mult):
        raise ValueError(f"model.ch_mult={list(ch_mult)} must be a non-empty list of positive integers")
    if ch < 1 or any((ch * m) % norm_groups for m in ch_mult):
        raise ValueError(
            f"model.ch={ch} times every model.ch_mult entry must be divisible by model.norm_groups={norm_groups} (GroupNorm)"
        )
    if num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks={num_res_blocks} must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must lie in [0, 1)")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"model.image_size={image_size} must be divisible by 2^(len(model.ch_mult) - 1) = {factor}: "
            f"the U-Net halves the resolution {len(ch_mult) - 1} times (check data.image_size)"
        )
    reached = [image_size // 2**i for i in range(len(ch_mult))]
    unreachable = [r for r in attn_resolutions if r not in reached]
    if unreachable:
        raise ValueError(
            f"model.attn_resolutions contains {unreachable}, which the U-Net never reaches: "
            f"with image_size={image_size} and {len(ch_mult)} levels its resolutions are {reached}"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes} must be a positive integer or null")


def _validate_heads(ch: int, ch_mult, attn_resolutions, image_size: int, attention_head_dim: int | None) -> None:
    """attention_head_dim (null: one head per block) must divide the channels of every attention block."""
    if attention_head_dim is None:
        return
    if isinstance(attention_head_dim, bool) or not isinstance(attention_head_dim, int) or attention_head_dim < 1:
        raise ValueError(f"model.attention_head_dim={attention_head_dim!r} must be a positive integer or null (one head)")
    widths = [ch * m for level, m in enumerate(ch_mult) if image_size // 2**level in attn_resolutions] + [ch * ch_mult[-1]]
    bad = sorted({w for w in widths if w % attention_head_dim})
    if bad:
        raise ValueError(f"model.attention_head_dim={attention_head_dim} must divide the channels of every attention block; {bad} are not multiples")
