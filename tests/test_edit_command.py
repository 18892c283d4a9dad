"""`python evaluate.py task=inpaint | task=sdedit` on a tiny checkpoint: images folder in, images/ and the
input | mask | result grid out, the known pixels kept; bad input stops before any compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.config import eval_cfg
from ddpm_lightning.control.module import ControlNetModule
from ddpm_lightning.diffusion.editing import Inpaint
from ddpm_lightning.edits import make_mask, read_images
from ddpm_lightning.images import to_model_range
from ddpm_lightning.interop.parity import randomize
from ddpm_lightning.tasks import evaluate
from ddpm_lightning.training.module import DiffusionModule

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = {
    "_target_": "ddpm_lightning.nets.UNet", "in_channels": 1, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
    "attn_resolutions": [], "dropout": 0.0, "image_size": 8, "norm_groups": 8,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    module = DiffusionModule(net=UNET, schedule={"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 10},
                             sampler={"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True},
                             optimizer={"_target_": "torch.optim.Adam", "_partial_": True}, image_size=8, channels=1)
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"{k}.png")
    return root, ckpt, images


def test_inpaint_and_sdedit_commands_write_images_and_grid(setup):
    root, ckpt, images = setup
    out = root / "inpaint"
    cfg = eval_cfg(ckpt, out, "task=inpaint", f"edit.images={images}", "edit.mask=lower", "edit.jump_length=2",
                   "edit.jump_n_sample=2", "sampler=ddpm", "~sampler.steps")
    result = evaluate(cfg)
    assert result["images"] == 3 and (out / "grid.png").is_file()
    written = sorted((out / "images").iterdir())
    assert len(written) == 3
    for src, dst in zip(sorted(images.iterdir()), written):
        a, b = np.asarray(Image.open(src)), np.asarray(Image.open(dst))
        assert (a[:4] == b[:4]).all()  # the upper half is kept
    cfg = eval_cfg(ckpt, root / "sdedit", "task=sdedit", f"edit.images={images}", "edit.strength=0.5")
    assert evaluate(cfg)["images"] == 3 and len(list((root / "sdedit" / "images").iterdir())) == 3


@pytest.mark.parametrize("overrides, match", [
    (["task=sdedit", "edit.strength=0"], "strength"),
    (["task=inpaint", "edit.mask=rect", "edit.rect=[0,0,9,2]"], "inside"),
    (["task=inpaint", "sampler=dpmpp_2m"], "ddpm or sampler=ddim"),
    (["task=paint"], "task"),
])
def test_bad_edit_commands_stop_before_compute(setup, overrides, match):
    root, ckpt, images = setup
    with pytest.raises(ValueError, match=match):
        evaluate(eval_cfg(ckpt, root / "bad", f"edit.images={images}", *overrides))


def test_images_of_another_size_are_refused(setup, tmp_path):
    root, ckpt, _ = setup
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="model makes"):
        evaluate(eval_cfg(ckpt, root / "bad", "task=sdedit", f"edit.images={tmp_path}"))


def test_inpaint_command_with_the_predictor_corrector_sampler(setup):
    root, ckpt, images = setup
    out = root / "inpaint_pc"
    cfg = eval_cfg(ckpt, out, "task=inpaint", f"edit.images={images}", "edit.mask=lower", "edit.jump_n_sample=1",
                   "sampler=pc", "sampler.steps=3")
    assert evaluate(cfg)["images"] == 3
    for src, dst in zip(sorted(images.iterdir()), sorted((out / "images").iterdir())):
        assert (np.asarray(Image.open(src))[:4] == np.asarray(Image.open(dst))[:4]).all()  # the upper half is kept
    with pytest.raises(ValueError, match="edit.jump_n_sample=1"):
        evaluate(eval_cfg(ckpt, root / "bad_pc", "task=inpaint", f"edit.images={images}", "sampler=pc"))


def test_edits_take_classifier_free_guidance_and_controlnet_conditions(setup):
    """Inpainting under classifier-free guidance (w = 0 is the conditional model, w = 3 moves the inpainted pixels
    only) and with a ControlNet (another condition moves the inpainted pixels only); random weights everywhere."""
    root, ckpt, images = setup
    x = to_model_range(read_images(images))
    mask = make_mask("lower", None, (8, 8))
    edit = Inpaint(x, mask, jump_length=2, jump_n_sample=2)
    parts = dict(schedule={"_target_": "ddpm_lightning.diffusion.schedules.linear", "T": 10},
                 sampler={"_target_": "ddpm_lightning.diffusion.samplers.ddpm", "_partial_": True},
                 optimizer={"_target_": "torch.optim.Adam", "_partial_": True}, image_size=8, channels=1)
    cond = DiffusionModule(net={**UNET, "num_classes": 3}, **parts)
    randomize(cond.net, 1)
    cfg = {"_target_": "ddpm_lightning.diffusion.guidance.ClassifierFree", "_partial_": True, "w": 0.0}
    plain = cond.sample(range(3), labels=[0, 1, 2], edit=edit)
    w0 = cond.sample(range(3), labels=[0, 1, 2], edit=edit, guidance=cfg)
    w3 = cond.sample(range(3), labels=[0, 1, 2], edit=edit, guidance={**cfg, "w": 3.0})
    torch.testing.assert_close(w0, plain)  # one doubled batch: equal up to rounding
    assert not torch.allclose(plain, w3, atol=1e-3)
    known = mask.expand_as(x).bool()
    assert torch.allclose(w3[known], x[known], atol=1e-6) and torch.allclose(plain[known], x[known], atol=1e-6)

    control = ControlNetModule(base_ckpt=str(ckpt), condition={"_target_": "ddpm_lightning.control.conditions.LowRes", "factor": 2},
                               optimizer=parts["optimizer"], image_size=8, channels=1, sampler=parts["sampler"])
    randomize(control.net, 2)  # the base too: its last convolution starts at zero
    hint = control.net.condition(x, None)
    a = control.sample(range(3), hint=hint, edit=edit)
    b = control.sample(range(3), hint=-hint, edit=edit)
    assert torch.allclose(a[known], x[known], atol=1e-6) and torch.allclose(b[known], x[known], atol=1e-6)
    assert not torch.allclose(a[~known], b[~known], atol=1e-3)
