"""Golden samples: a fixed tiny checkpoint (tests/data/golden/tiny.ckpt, written by an earlier version of the
package) still loads, and its samples for fixed seeds equal the ones recorded with it, for DDIM, DPM-Solver++(2M)
and ancestral DDPM sampling, with PyTorch's operators (the network as loaded, not accelerated). A change of
structure must change no number."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_lightning.loading import load_model

GOLDEN = Path(__file__).parent / "data" / "golden"
SEEDS = [0, 1, 2, 3]
SAMPLERS = {  # name -> sampler config, as a stored config names it (the grids of the time it was recorded)
    "ddim": {"_target_": "ddpm_lightning.samplers.ddim", "_partial_": True, "steps": 10, "spacing": "uniform"},
    "dpmpp_2m": {"_target_": "ddpm_lightning.samplers.dpmpp_2m", "_partial_": True, "steps": 10},
    "ddpm": {"_target_": "ddpm_lightning.samplers.ddpm", "_partial_": True, "steps": 50, "spacing": "uniform"},
}
TOL = 1e-5  # float32 on another CPU may round differently; a changed computation moves samples by far more


def golden_samples(ckpt: Path) -> dict[str, torch.Tensor]:
    """The samples of `ckpt` (EMA weights, contiguous layout) for SEEDS under each of SAMPLERS, and the chain's
    state before its last step (not clipped to [-1, 1])."""
    module = load_model(ckpt)
    module.net.to(memory_format=torch.contiguous_format)
    out = {}
    with torch.no_grad():
        for name, cfg in SAMPLERS.items():
            states = []
            out[name] = module.sample(SEEDS, sampler=cfg, callback=lambda k, x: states.append(x.clone()))
            out[f"{name}_state"] = states[-2]
    return out


def test_an_old_checkpoint_loads_and_samples_as_it_did():
    recorded = torch.load(GOLDEN / "samples.pt", weights_only=True)
    samples = golden_samples(GOLDEN / "tiny.ckpt")
    assert samples.keys() == recorded.keys()
    for name, x in samples.items():
        assert x.shape == (len(SEEDS), 1, 8, 8)
        assert (x - recorded[name]).abs().max() <= TOL * max(1.0, recorded[name].abs().max()), name
    for name in SAMPLERS:  # the samples are not all clipped to +-1: they carry the model's numbers
        assert (samples[name].abs() < 0.99).float().mean() > 0.05, name
    # the samplers differ from each other by far more than TOL: the comparison could fail
    assert (samples["ddim"] - samples["ddpm"]).abs().max() > 0.1


def test_the_old_checkpoint_names_its_parts_by_their_old_paths():
    hp = torch.load(GOLDEN / "tiny.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["net"]["_target_"] == "ddpm_lightning.nets.UNet"
    assert hp["schedule"]["_target_"] == "ddpm_lightning.schedules.linear"
    assert hp["sampler"]["_target_"] == "ddpm_lightning.samplers.ddim"
