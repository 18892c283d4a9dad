"""Import parity with diffusers, checkable without a download: the published google/ddpm-* configs, small layouts
our U-Net supports, diffusers models with random weights in every layer (so a wrong mapping changes the output),
and the pieces that compare one sampler step with diffusers' on equal terms. Needs diffusers (`pip install -e
".[diffusers]"`); used by tests/test_diffusers_io.py and benchmarks/diffusers_parity.py."""

from __future__ import annotations

import torch

# google/ddpm-cifar10-32's unet/config.json as published (the google/ddpm-* family shares every key but the blocks).
GOOGLE_CIFAR10 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The google/ddpm-* scheduler_config.json (as published for ddpm-cat-256).
GOOGLE_SCHEDULER = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
    "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small",
}
# Small layouts our U-Net supports: class-conditional with diffusers' default embedding order (flip_sin_to_cos)
# and symmetric padding; a 64x64, 4-level model with attention at two resolutions.
CLASS_COND = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
    "downsample_padding": 1, "norm_eps": 1e-5, "freq_shift": 1, "flip_sin_to_cos": True, "attention_head_dim": None,
    "num_class_embeds": 5,
}
SIZE64 = {
    "sample_size": 64, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "layers_per_block": 1,
    "downsample_padding": 0, "norm_eps": 1e-6, "freq_shift": 1, "flip_sin_to_cos": False, "attention_head_dim": None,
}
# diffusers' examples/unconditional_image_generation/train_unconditional.py builds its UNet2DModel with diffusers'
# defaults for the rest (most community DDPM checkpoints on the Hub): attention_head_dim 8 (multi-head attention),
# freq_shift 0, flip_sin_to_cos true, downsample_padding 1, norm_eps 1e-5. Its layout, narrowed to 16x16 digits.
TRAIN_UNCONDITIONAL = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 2, "block_out_channels": [32, 32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (norm scales around 1), outputs of order 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = 0.2 if p.ndim == 1 else fan_in**-0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def diffusers_unet(config: dict, seed: int = 0):
    """diffusers' UNet2DModel of `config` with random weights (`randomize`)."""
    import diffusers

    return randomize(diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}), seed)


def save_pipeline(unet, folder, scheduler: dict = GOOGLE_SCHEDULER):
    """Write `unet` and a DDPMScheduler of `scheduler` as a DDPMPipeline folder."""
    import diffusers

    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(folder)
    return folder


def inputs(unet, n: int = 2, seed: int = 1):
    """n random inputs x of the UNet2DModel's shape and times spread over [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(n, c, s, s, generator=g), torch.tensor([0, 917, 443, 5][:n])


class FixedOutput(torch.nn.Module):
    """A 'network' returning a fixed output, so one sampler step can be compared with diffusers' on equal terms."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, **_):
        return self.out


class QueuedNoise:
    """Noise handed out from a list, so that a sampler step draws the noise diffusers' step was given."""

    def __init__(self, z):
        self.z = list(z)

    def randn_like(self, x):
        return self.z.pop(0)
