"""`batch.unpack`: every form a data module yields becomes the one dict the models read."""

import torch

from ddpm_lightning.batch import unpack


def test_every_batch_form_unpacks_to_x_and_y():
    x, y, hint = torch.zeros(2, 1, 8, 8), torch.tensor([3, 4]), torch.ones(2, 1, 8, 8)
    assert unpack((x, y))["x"] is x and unpack((x, y))["y"] is y
    assert unpack([x, y])["y"] is y
    assert unpack(x) == {"x": x, "y": None} and unpack((x,))["y"] is None
    assert unpack({"x": x, "hint": hint}) == {"x": x, "y": None, "hint": hint}
    assert unpack({"x": x, "y": y})["y"] is y
