"""The DDPM U-Net: exact parameter counts of the papers' models, shapes, optional inputs, bad configs."""

import math

import pytest
import torch
from hydra.utils import instantiate

from helpers.config import compose_cfg
from ddpm_lightning.nets import UNet
from ddpm_lightning.nets.unet import timestep_embedding


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar10_config_has_paper_parameter_count():
    # Ho et al. 2020 §4: the CIFAR-10 model has 35.7M parameters; 35,746,307 exactly in their code (35,749,766 with 6 output channels).
    cfg = compose_cfg(["model=unet_cifar10", "data.image_size=32", "data.channels=1"], tiny=False)
    cfg.model.in_channels = 3
    net = instantiate(cfg.model)
    assert n_params(net) == 35_746_307
    assert n_params(UNet(out_channels=6)) == 35_749_766
    assert cfg.model.dropout == 0.1 and list(cfg.model.ch_mult) == [1, 2, 2, 2]


def test_256_model_parameter_count():
    # Ho et al. 2020 §4: the 256x256 models (ch_mult 1,1,2,2,4,4) have 114M parameters; 113,673,219 exactly in their code.
    assert n_params(UNet(ch_mult=(1, 1, 2, 2, 4, 4), image_size=256)) == 113_673_219


@pytest.mark.parametrize("model, size", [("unet_small", 16), ("unet_cifar10", 32), ("unet_celeba64", 64)])
def test_every_model_config_maps_input_shape_to_output_shape(model, size):
    cfg = compose_cfg([f"model={model}", f"data.image_size={size}"], tiny=False)
    net = instantiate(cfg.model).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_timestep_embedding_formula():
    # Ho et al. get_timestep_embedding: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (half - 1)).
    emb = timestep_embedding(torch.tensor([7.0]), 8)
    k = 2
    w = 10000 ** (-k / 3)
    assert emb[0, k].item() == pytest.approx(math.sin(7 * w), abs=1e-6)
    assert emb[0, 4 + k].item() == pytest.approx(math.cos(7 * w), abs=1e-6)


def test_zero_initialised_output_and_label_and_control_inputs():
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8, num_classes=10, dropout=0.0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    # The last conv starts at zero (Ho et al. init_scale = 0), so the initial output is exactly zero.
    assert torch.count_nonzero(net(x, t)) == 0
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    y = torch.tensor([0, 1, 2])
    out_cond, out_null = net(x, t, y=y), net(x, t)
    assert not torch.allclose(out_cond, out_null)
    # Omitting y is the same as passing the null label num_classes.
    assert torch.allclose(out_null, net(x, t, y=torch.full((3,), 10)))
    # Control residuals: zero residuals change nothing; a non-zero one does.
    with torch.no_grad():
        h = x
        shapes = []
        temb = net.temb(timestep_embedding(t, 32))
        for unit in net.down:
            h = unit(h, temb)
            shapes.append(h.shape)
        shapes.append(h.shape)
    zeros = [torch.zeros(s) for s in shapes]
    assert torch.allclose(net(x, t, y=y, control=zeros), out_cond)
    bump = [z.clone() for z in zeros]
    bump[-1] += 1.0
    assert not torch.allclose(net(x, t, y=y, control=bump), out_cond)
    with pytest.raises(ValueError, match="num_classes"):
        UNet(in_channels=1, ch=32, ch_mult=(1,), image_size=8, attn_resolutions=())(x, t[:3], y=y)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"image_size": 30}, "model.image_size"),
        ({"attn_resolutions": (7,)}, "model.attn_resolutions"),
        ({"ch": 40}, "model.ch"),
        ({"ch_mult": ()}, "model.ch_mult"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"num_res_blocks": 0}, "model.num_res_blocks"),
    ],
)
def test_bad_unet_configs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        UNet(**kwargs)


def test_wrong_input_shape_is_reported():
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=8)
    with pytest.raises(ValueError, match="model.in_channels"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([0]))
