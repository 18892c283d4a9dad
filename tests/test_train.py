"""End to end through train(): checkpoints, sample grids, resume, EMA, and loading for sampling."""


import csv
import math

import lightning as L
import pytest
import torch
from PIL import Image

from helpers.config import compose_cfg
from ddpm_lightning.training.callbacks import EMA
from ddpm_lightning.compose import build
from ddpm_lightning.loading import load_model
from ddpm_lightning.tasks import check_resumable, train
from ddpm_lightning.training.module import lr_factor


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run, then a resume to 6 steps in a second run directory."""
    root = tmp_path_factory.mktemp("run")
    first = compose_cfg([], root / "first")
    train(first)
    last = root / "first" / "checkpoints" / "last.ckpt"
    second = compose_cfg([f"ckpt_path={last}", "trainer.max_steps=6"], root / "second")
    saved = torch.load(last, weights_only=False)  # before the resumed run can touch anything
    train(second)
    return root, saved


def test_run_writes_checkpoint_config_and_png_grids(trained):
    root, _ = trained
    run = root / "first"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    img = Image.open(grids[-1])
    # 4 samples of 8x8 in a 2x2 grid with 2-pixel padding
    assert img.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    nfe = metrics[0].split(",").index("samples/nfe")
    assert {row.split(",")[nfe] for row in metrics[1:]} >= {"10.0"}  # the grids: DPM-Solver++(2M), 10 steps: 10 network evaluations


def test_resume_continues_step_optimizer_lr_and_ema(trained):
    root, saved = trained
    assert saved["global_step"] == 4
    final = torch.load(root / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 6
    # Adam's step counter continued from 4, not from 0.
    adam_steps = {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6}
    # The LR schedule continued (warm-up of 2 steps: factor 1 from then on).
    assert final["lr_schedulers"][0]["last_epoch"] == 6
    # EMA state continued: 6 updates in all.
    assert int(final["averaging_state"]["n_averaged"]) == 6
    # The resumed run started from the saved raw weights, not the EMA ones: its first grid is at step 6.
    assert sorted(p.name for p in (root / "second" / "samples").glob("*.png")) == ["step_0000006.png"]


class Probe(L.Callback):
    """Records the raw and EMA weights as training starts."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.seen["raw"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        self.seen["ema"] = {k: v.clone() for k, v in ema.averaged_module().state_dict().items()}


def test_resumed_weights_start_from_checkpoint(tmp_path):
    """Resuming loads the raw weights into the model and the EMA weights into the average."""
    first = compose_cfg(["trainer.max_steps=2"], tmp_path / "a")
    train(first)
    ckpt_path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    seen = Probe.seen

    cfg = compose_cfg([f"ckpt_path={ckpt_path}", "trainer.max_steps=3", "+callbacks.probe._target_=test_train.Probe"], tmp_path / "b")
    train(cfg)
    for k, v in ckpt["current_model_state"].items():
        assert torch.equal(seen["raw"][k], v), k
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(seen["ema"][k], v), k
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])


def test_load_model_for_sampling_in_one_call(trained):
    root, _ = trained
    path = root / "second" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    ema = load_model(path)
    raw = load_model(path, use_ema=False)
    assert not ema.training
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(ema.state_dict()[k], v)
    for k, v in ckpt["current_model_state"].items():
        assert torch.equal(raw.state_dict()[k], v)
    images = ema.sample([0, 1, 2])
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    # per-sample seeds: a sample does not depend on the rest of its batch
    assert torch.allclose(ema.sample([1]), images[1:2], atol=1e-5)


def test_checkpoint_of_another_model_is_refused_before_training(trained, tmp_path):
    root, _ = trained
    last = root / "first" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg([f"ckpt_path={last}", "model.ch=64"], tmp_path)
    with pytest.raises(ValueError, match=r"model\.ch: checkpoint has 32, config has 64"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
    cfg = compose_cfg([f"ckpt_path={last}", "schedule=cosine"], tmp_path)
    with pytest.raises(ValueError, match="schedule"):
        train(cfg)
    # the legacy UNet switches model.fused_norm / model.winograd (ignored; written by versions before the runtime
    # setting `kernels`) chose how the same network computes: a checkpoint resumes whether its config or the
    # current one holds them
    module = build(compose_cfg(["+model.winograd=true", "+model.fused_norm=true"], tmp_path).module)
    check_resumable(last, module)


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        train(compose_cfg([f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "run"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_model(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a ddpm-lightning checkpoint"):
        load_model(foreign)


@pytest.mark.parametrize(
    "override, key",
    [
        ("schedule.T=0", "schedule.T"),
        ("schedule.beta_end=1.5", "schedule.beta_end"),
        ("data.image_size=9", "model.image_size"),
        ("model.attn_resolutions=[6]", "model.attn_resolutions"),  # between the levels 8 and 4
        ("data.channels=3", "data.channels"),
    ],
)
def test_bad_config_fails_before_training(override, key, tmp_path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(compose_cfg([override], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [["logger=tensorboard"], ["logger=wandb"], ["trainer.precision=bf16-mixed", "logger=none"]])
def test_loggers_and_precision_compose_into_a_run(overrides, tmp_path):
    metrics = train(compose_cfg(overrides + ["trainer.max_steps=2"], tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    if "logger=tensorboard" in overrides:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if "logger=wandb" in overrides:
        assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_train_sets_the_allocator_and_trains_channels_last(trained, tmp_path, monkeypatch):
    """conf retain_freed_memory (default true) reaches cpu.retain_freed_memory through the one switch
    (tasks.cpu_plugin); module.channels_last (default true) lays the trained network out channels-last, and a
    checkpoint loads back that way."""
    import ddpm_lightning.cpu as cpu

    calls = []
    monkeypatch.setattr(cpu, "retain_freed_memory", lambda: calls.append(1) or True)
    train(compose_cfg(["trainer.max_steps=1"], tmp_path / "a"))
    train(compose_cfg(["trainer.max_steps=1", "retain_freed_memory=false"], tmp_path / "b"))
    assert calls == [1]
    module = load_model(trained[0] / "first" / "checkpoints" / "last.ckpt")
    convs = [m.weight for m in module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1]  # [O, 1, 3, 3] is both layouts
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)


def test_lr_factor_warms_up_then_decays_to_zero_at_the_last_step():
    assert [lr_factor(s, 4) for s in (0, 3, 4, 10**6)] == [0.25, 1.0, 1.0, 1.0]  # Ho et al.: warm-up, then constant
    assert [lr_factor(s, 0) for s in (0, 7)] == [1.0, 1.0]
    # after a warm-up of 100 steps, a cosine (Loshchilov & Hutter eq. 5, eta_min = 0) over the 1500 steps left
    for step in (100, 475, 850, 1225, 1600):
        progress = (step - 100) / 1500
        assert lr_factor(step, 100, "cosine", 1600) == pytest.approx((1 + math.cos(math.pi * progress)) / 2, abs=1e-12)
        assert lr_factor(step, 100, "linear", 1600) == pytest.approx(1 - progress, abs=1e-12)
    assert lr_factor(850, 100, "cosine", 1600) == pytest.approx(0.5) and lr_factor(1600, 100, "cosine", 1600) == 0.0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_run_logs_the_decayed_learning_rate_of_every_step(decay, tmp_path, capsys):
    train(compose_cfg([f"module.lr_decay={decay}", "trainer.max_steps=6", "callbacks.samples.every_n_steps=0"], tmp_path))
    # the summary's "train further" says that the decay would run on to the new length
    assert f"trainer.max_steps=12  # module.lr_decay={decay} then ends at the new max_steps" in capsys.readouterr().out
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")) if r.get("lr-Adam")]
    logged = {int(r["step"]): float(r["lr-Adam"]) for r in rows}
    assert sorted(logged) == list(range(6))
    lr = compose_cfg().module.optimizer.lr
    for step, value in logged.items():
        assert value == pytest.approx(lr * lr_factor(step, 2, decay, 6), rel=1e-6, abs=1e-12)
    assert logged[1] == pytest.approx(lr) and logged[5] <= lr / 4  # the warm-up's end, then down towards zero


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["module.lr_decay=exponential"], r"module.lr_decay='exponential' must be one of \('constant', 'cosine', 'linear'\)"),
        (["module.lr_decay=cosine", "trainer.max_steps=-1", "trainer.max_epochs=1"], r"trainer.max_steps, which must be set"),
        (["module.lr_decay=linear", "module.warmup_steps=4"], r"exceed module.warmup_steps=4 \(trainer.max_steps=4\)"),
    ],
)
def test_a_learning_rate_decay_that_cannot_run_is_refused_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(compose_cfg(overrides, tmp_path))
    assert not (tmp_path / "checkpoints").exists()
