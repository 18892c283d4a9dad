"""evaluate(cfg) end to end, offline: a random-weights Inception file in torch-fidelity's format, a tiny run
trained with the FID callback, sharded / resumed / DDP sampling, and the start-up errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch

from helpers.config import compose_cfg
from helpers.config import eval_cfg
from ddpm_lightning import evaluation
from ddpm_lightning import metrics as M
from ddpm_lightning.tasks import evaluate, train

ROOT = Path(__file__).resolve().parents[1]


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random (He-initialised) weights, saved as the state dict it loads."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), mock.patch.object(
        fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run with the FID callback every 2 steps (4 samples, 64-d features, 8 reference digits)."""
    root = tmp_path_factory.mktemp("eval")
    weights = random_inception_weights(root / "inception.pth")
    cfg = compose_cfg(
        [
            "callbacks=fid",
            "callbacks.fid.every_n_steps=2",
            "callbacks.fid.num_samples=4",
            "callbacks.fid.batch_size=4",
            f"callbacks.fid.weights_path={weights}",
            "callbacks.fid.feature=64",
            "callbacks.fid.max_reference_images=8",
            f"callbacks.fid.cache_dir={root / 'cache'}",
            "+callbacks.keep._target_=test_evaluate.Keep",
        ],
        root / "run",
    )
    logged = train(cfg)
    return root, weights, root / "run" / "checkpoints" / "last.ckpt", Keep.fid.history, logged


class Keep(L.Callback):
    """Keeps the run's FID callback, to read its history."""

    fid = None

    def on_train_end(self, trainer, pl_module):
        Keep.fid = next(c for c in trainer.callbacks if type(c).__name__ == "FID")




def test_fid_callback_logs_val_fid_and_keeps_best_checkpoint(run):
    root, _, _, history, logged = run
    assert sorted(history) == [2, 4]
    assert all(np.isfinite(v) and v > 0 for v in history.values())
    assert logged["val/fid"] == pytest.approx(history[4])
    best = list((root / "run" / "checkpoints").glob("best_fid_step_*.ckpt"))
    assert [p.name for p in best] == [f"best_fid_step_{min(history, key=history.get):07d}.ckpt"]
    ckpt = torch.load(best[0], weights_only=False)
    monitor = next(v for k, v in ckpt["callbacks"].items() if "val/fid" in k)
    assert monitor["best_model_score"].item() == pytest.approx(min(history.values()), rel=1e-5)
    assert len(list((root / "cache").glob("DigitsDataModule-train-8px-inception-v3-compat-*.pt"))) == 1


def test_full_pipeline_offline_writes_samples_and_metrics(run, tmp_path):
    root, weights, ckpt, *_ = run
    cfg = eval_cfg(
        ckpt, tmp_path / "e", "metrics=[fid,isc,kid]", f"inception.weights_path={weights}", "inception.feature=64",
        "reference.max_images=8", f"reference.cache_dir={root / 'cache'}", "isc_splits=2", "kid_subsets=3",
        "kid_subset_size=4", "save_png=true",
    )
    result = evaluate(cfg)
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["metrics"]) == {"fid", "isc", "isc_std", "kid", "kid_std"}
    assert all(np.isfinite(v) for v in saved["metrics"].values())
    assert saved["metrics"]["isc"] >= 1.0 and saved["metrics"]["fid"] > 0
    assert (saved["sampler"], saved["steps"], saved["nfe"], saved["num_samples"]) == ("ddim", 3, 3, 6)
    assert saved["seeds"] == {"first": 0, "last": 5}
    assert saved["checkpoint"]["global_step"] == 4 and saved["checkpoint"]["use_ema"] is True
    samples = np.load(tmp_path / "e" / "samples.npz")["arr_0"]
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
    assert len(list((tmp_path / "e" / "images").glob("*.png"))) == 6
    assert (tmp_path / "e" / "grid.png").is_file()
    # The reference came from the cache the training callback wrote (same data module, split, size, extractor).
    assert saved["reference"]["cache"].startswith(str(root / "cache"))
    # FID recomputed from the written samples and the cached reference, by scipy.
    from scipy import linalg

    extractor = M.feature_extractor(str(weights), ["64"])
    x = M.extract_features(torch.from_numpy(samples).permute(0, 3, 1, 2), extractor, verbose=False)["64"].double().numpy()
    y = torch.load(saved["reference"]["cache"], weights_only=False)["64"].double().numpy()
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fid = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cx + cy - 2 * linalg.sqrtm(cx @ cy).real)
    assert saved["metrics"]["fid"] == pytest.approx(fid, rel=1e-4)
    # FID of a set against itself is ~0 through the real extractor.
    feats = torch.from_numpy(x)
    assert M.compute_metrics(["fid"], {"64": feats}, {"64": feats}, feature="64")["fid"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("sampler, steps, nfe", [("dpmpp_2m", 3, 3), ("heun", 3, 5), ("euler_ancestral", 2, 2)])
def test_few_step_samplers_from_the_command_line_count_their_nfe(run, tmp_path, sampler, steps, nfe):
    _, _, ckpt, *_ = run
    result = evaluate(eval_cfg(ckpt, tmp_path / "e", f"sampler={sampler}", f"sampler.steps={steps}"))
    assert (result["sampler"], result["steps"], result["nfe"]) == (sampler, steps, nfe)
    samples = np.load(tmp_path / "e" / "samples.npz")["arr_0"]
    assert samples.shape == (6, 8, 8, 1) and len(np.unique(samples.reshape(6, -1), axis=0)) == 6


@pytest.fixture(scope="module")
def uninterrupted(run, tmp_path_factory):
    _, _, ckpt, *_ = run
    out = tmp_path_factory.mktemp("whole")
    evaluate(eval_cfg(ckpt, out))
    return np.load(out / "samples.npz")["arr_0"]


def test_interrupted_run_continues_from_its_shards(run, uninterrupted, tmp_path):
    _, _, ckpt, *_ = run
    real, calls = evaluation.sample_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with mock.patch.object(evaluation, "sample_shard", crash_on_second), pytest.raises(KeyboardInterrupt):
        evaluate(eval_cfg(ckpt, tmp_path))
    assert [p.name for p in sorted((tmp_path / "shards").iterdir())] == ["seeds_00000000-00000002.npz"]
    calls.clear()
    with mock.patch.object(evaluation, "sample_shard", lambda *a, **k: calls.append(a[2]) or real(*a, **k)):
        evaluate(eval_cfg(ckpt, tmp_path))
    assert calls == [2, 4]  # only the missing shards were sampled
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], uninterrupted)
    # Another sampler into the same folder is refused rather than mixed in.
    with pytest.raises(ValueError, match="another model or sampler"):
        evaluate(eval_cfg(ckpt, tmp_path, "sampler.steps=4"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_processes_give_the_same_samples(run, uninterrupted, tmp_path):
    _, _, ckpt, *_ = run
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", str(ROOT / "evaluate.py"),
        f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "sampler=ddim", "sampler.steps=3", "num_samples=6",
        "shard_size=2", "batch_size=2", "metrics=[]", "grid_size=4", "trainer.accelerator=cpu", "trainer.devices=2",
    ]
    # the same thread count as this process, so nothing but the number of processes differs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["world_size"] == 2
    assert np.load(tmp_path / "samples.npz")["arr_0"].tobytes() == uninterrupted.tobytes()


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled before the start-up checks failed")


def test_missing_weights_fail_before_sampling(run, tmp_path, monkeypatch):
    _, _, ckpt, *_ = run
    with mock.patch.object(evaluation, "sample_shard", _no_sampling):
        with pytest.raises(FileNotFoundError) as e:
            evaluate(eval_cfg(ckpt, tmp_path, "metrics=[fid]", f"inception.weights_path={tmp_path / 'none.pth'}"))
        msg = str(e.value)
        assert str(tmp_path / "none.pth") in msg and M.inception_weights_url() in msg and "inception.weights_path" in msg
        # Not cached and not downloadable (an offline node).
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setattr(torch.hub, "download_url_to_file", mock.Mock(side_effect=OSError("no network")))
        with pytest.raises(FileNotFoundError) as e:
            evaluate(eval_cfg(ckpt, tmp_path, "metrics=[fid]"))
        msg = str(e.value)
        assert "weights-inception-2015-12-05" in msg and M.inception_weights_url() in msg and "inception.weights_path" in msg


class MissingData(L.LightningDataModule):
    """A data module whose files are not there (as a dataset that may not be downloaded)."""

    def __init__(self, image_size: int = 8):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage=None):
        raise FileNotFoundError("cifar-10-batches-py not found under data/")


def test_missing_dataset_fails_before_sampling(run, tmp_path):
    root, weights, ckpt, *_ = run
    common = ("metrics=[fid]", f"inception.weights_path={weights}", f"reference.cache_dir={tmp_path / 'cache'}", "inception.feature=64")
    with mock.patch.object(evaluation, "sample_shard", _no_sampling):
        with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*reference.folder"):
            evaluate(eval_cfg(ckpt, tmp_path / "a", *common, "+data._target_=test_evaluate.MissingData", "+data.image_size=8"))
        lone = tmp_path / "lone" / "last.ckpt"  # a checkpoint without its run directory
        lone.parent.mkdir()
        lone.write_bytes(ckpt.read_bytes())
        with pytest.raises(FileNotFoundError, match="data=<name>"):
            evaluate(eval_cfg(lone, tmp_path / "b", *common))
        with pytest.raises(FileNotFoundError, match="reference.folder"):
            evaluate(eval_cfg(lone, tmp_path / "c", *common, f"reference.folder={tmp_path / 'nothing'}"))


def test_reference_stats_file_gives_fid_against_its_mu_and_sigma(run, tmp_path):
    _, weights, ckpt, *_ = run
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64))
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=rng.standard_normal(64), sigma=a @ a.T / 64)
    saved = evaluate(eval_cfg(
        ckpt, tmp_path / "e", "metrics=[fid]", f"inception.weights_path={weights}", "inception.feature=64",
        f"reference.stats={stats}",
    ))
    assert saved["reference"] == {"stats": str(stats)}
    samples = torch.from_numpy(np.load(tmp_path / "e" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    x = M.extract_features(samples, M.feature_extractor(str(weights), ["64"]), verbose=False)["64"].double().numpy()
    with np.load(stats) as f:
        expected = M.frechet_distance(x.mean(0), np.cov(x, rowvar=False), f["mu"], f["sigma"])
    assert saved["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)


def test_fid_callback_checks_weights_before_training(tmp_path):
    from ddpm_lightning.training.callbacks import FID

    callback = FID(weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="callbacks.fid.weights_path"):
        callback.setup(mock.Mock(is_global_zero=True), None, "fit")


def test_nll_metric_is_bits_per_dim_of_the_validation_split_without_sampling(run, tmp_path):
    from ddpm_lightning.data import DigitsDataModule
    from ddpm_lightning.diffusion.likelihood import bits_per_dim
    from ddpm_lightning.loading import load_model

    _, _, ckpt, *_ = run
    with mock.patch.object(evaluation, "sample_shard", _no_sampling):
        result = evaluate(eval_cfg(ckpt, tmp_path, "metrics=[nll]", "nll.max_images=8", "nll.estimators=[vlb]"))
    dm = DigitsDataModule(image_size=8, batch_size=16)
    dm.setup()
    x = torch.stack([dm.val_set[i][0] for i in range(8)])
    expected = bits_per_dim(load_model(ckpt), x, estimators=["vlb"], seed=0)
    assert result["metrics"]["nll/vlb/bpd"] == pytest.approx(expected["vlb/bpd"], rel=1e-6)
    assert {"nll/vlb/L_T", "nll/vlb/L_0"} <= set(result["metrics"]) and result["num_samples"] == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == result["metrics"]
    with pytest.raises(ValueError, match="nll.split='test'"):
        evaluate(eval_cfg(ckpt, tmp_path / "b", "metrics=[nll]", "nll.split=test"))


def test_output_dir_is_continued_only_under_its_fingerprint_with_shards_of_the_model_shape(tmp_path):
    fingerprint = {"ckpt_sha256": "b" * 64, "image_shape": [1, 8, 8]}
    out = tmp_path / "eval"
    (out / "shards").mkdir(parents=True)
    evaluation.save_shard(evaluation.shard_path(out / "shards", 0, 2), np.zeros((2, 1, 8, 8), np.uint8), 0, 2, 3)
    with pytest.raises(ValueError, match=r"holds 1 sample shards but no fingerprint.json"):  # another model's, maybe
        evaluation._claim_output_dir(out, fingerprint)
    assert not (out / "fingerprint.json").exists()
    (out / "fingerprint.json").write_text(json.dumps(fingerprint))
    evaluation._claim_output_dir(out, fingerprint)  # its own shards: continued
    with pytest.raises(ValueError, match="holds samples of another model"):
        evaluation._claim_output_dir(out, {**fingerprint, "ckpt_sha256": "a" * 64})
    evaluation.save_shard(evaluation.shard_path(out / "shards", 2, 4), np.zeros((2, 3, 64, 64), np.uint8), 2, 4, 3)
    with pytest.raises(ValueError, match=r"seeds_00000002-00000004.npz holds images of shape \(3, 64, 64\)"):
        evaluation._claim_output_dir(out, fingerprint)


def test_a_fingerprint_without_shards_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "eval"
    failed = {"ckpt_sha256": "b" * 64, "image_shape": [1, 8, 8], "labels": [12]}  # failed before its first shard
    evaluation._claim_output_dir(out, failed)
    corrected = {**failed, "labels": [1]}
    evaluation._claim_output_dir(out, corrected)
    assert json.loads((out / "fingerprint.json").read_text()) == corrected
