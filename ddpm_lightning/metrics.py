"""Sample-quality metrics through torch-fidelity: FID (Heusel et al. 2017), Inception Score (Salimans et al.
2016) and KID (Binkowski et al. 2018) on the features of the TF-compatible Inception-v3 (`inception-v3-compat`,
the network the papers' numbers were computed with), plus on-disk caching of a dataset's reference features.

torch-fidelity does the feature extraction and the metric arithmetic; this module only feeds it uint8 images,
checks that its weights are there before any compute is spent, and keys the reference cache.
"""

from __future__ import annotations

import dataclasses

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ddpm_lightning.checkpointing import load_file
from ddpm_lightning.images import to_uint8

log = logging.getLogger(__name__)

# The metrics torch-fidelity computes for us. FID and KID read the 2048-d pool features of `inception-v3-compat`
# (as in the papers; "64", "192" and "768" are earlier, cheaper layers for quick checks), IS its logits.
FIDELITY_METRICS = ("fid", "isc", "kid")
FEATURES = ("64", "192", "768", "2048")


def features_for(names: Iterable[str], feature: str = "2048") -> list[str]:
    """The extractor outputs the metrics `names` need."""
    if str(feature) not in FEATURES:
        raise ValueError(f"inception.feature={feature} must be one of {list(FEATURES)}")
    names = set(names)
    return sorted(({str(feature)} if names & {"fid", "kid"} else set()) | ({"logits_unbiased"} if "isc" in names else set()))
# torch-fidelity's output keys -> ours.
KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
}
KNOWN_METRICS = FIDELITY_METRICS + ("nll",)


def check_metric_names(names: Iterable[str]) -> list[str]:
    """The requested metrics, or a clear error for a name we do not know or cannot compute in this install."""
    names = list(names)
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"metrics={names}: unknown {unknown}; choose from {list(KNOWN_METRICS)}")
    return names


# --------------------------------------------------------------------------------------------- Inception weights


def inception_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def resolve_inception_weights(weights_path: str | None, key: str = "weights_path", download: bool = True) -> str:
    """A local file holding the `inception-v3-compat` weights: `weights_path` if given, else torch hub's cached
    download, fetched now if missing. Raises one clear error (file, URL, config key) when it cannot be had, so
    that a run on an offline node stops before it samples anything."""
    url = inception_weights_url()
    hint = (
        f"Download {url} on a machine with internet access and point {key}=<path to that .pth> at the copy"
    )
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path} ({key}). {hint}.")
        return check_inception_weights(path, key, hint)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return check_inception_weights(cached, key, hint + f", or delete {cached} to download it again")
    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=True)
            return check_inception_weights(cached, key, hint)
        except Exception as e:  # offline node, proxy, ...
            cached.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"Inception weights are missing: {cached} is not cached and downloading it failed "
                f"({type(e).__name__}: {e}). {hint}."
            ) from None
    raise FileNotFoundError(f"Inception weights are missing: {cached}. {hint}.")


def check_inception_weights(path: Path, key: str, hint: str = "") -> str:
    """The weights file as a path, after checking that it is a plain state dict of tensors (torch-fidelity then
    loads it itself, with weights_only=False): a corrupt file or one whose pickle would run code is refused here,
    naming the file and the config key."""
    stat = path.stat()
    _check_state_dict_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns, key, hint)
    return str(path)


@functools.lru_cache(maxsize=4)
def _check_state_dict_file(path: str, size: int, mtime_ns: int, key: str, hint: str) -> None:
    try:
        state = load_file(path, key, what="Inception weights file")
    except ValueError as e:
        raise ValueError(f"{e}. {hint}.") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} ({key}) is not an Inception weights file (expected a state dict of tensors). {hint}.")


def feature_extractor(weights_path: str, features: Sequence[str], device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity's `inception-v3-compat` with the given weights file, producing `features`."""
    from torch_fidelity.utils import create_feature_extractor

    extractor = create_feature_extractor(
        "inception-v3-compat", sorted(set(features)), cuda=False, feature_extractor_weights_path=weights_path, verbose=False
    )
    return extractor.to(device)


# ---------------------------------------------------------------------------------------------- images -> features


class UInt8Images(Dataset):
    """uint8 images [N, C, H, W] (C = 1 or 3) as torch-fidelity wants them: [3, H, W] uint8, grey repeated to RGB."""

    def __init__(self, images: Tensor | np.ndarray):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def images_of(dataset: Dataset, max_images: int | None = None, batch_size: int = 256) -> Tensor:
    """The first `max_images` images of a dataset yielding [-1, 1] images (or (image, label) pairs), as uint8."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    out = [to_uint8(b[0] if isinstance(b, (list, tuple)) else b) for b in loader]
    return torch.cat(out)


def extract_features(
    images: Tensor | Dataset, extractor: torch.nn.Module, batch_size: int = 64, verbose: bool = True
) -> dict[str, Tensor]:
    """Features of uint8 images (or a torch-fidelity style Dataset), keyed by feature name; with a progress bar."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    dataset = images if isinstance(images, Dataset) else UInt8Images(images)
    device = next(extractor.parameters()).device
    if device.type == "cuda":  # torch-fidelity moves batches to the default CUDA device
        torch.cuda.set_device(device)
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, device.type == "cuda", True, verbose)


# ------------------------------------------------------------------------------------------------------- metrics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Heusel et al. 2017, eq. 6),
    computed by torch-fidelity (trace of the square root from the eigenvalues of S1 S2)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    stats = [{"mu": np.asarray(m, np.float64), "sigma": np.atleast_2d(np.asarray(s, np.float64))} for m, s in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]


def gaussian_statistics(features: Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of features [N, D] (in float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double())


def compute_metrics(
    names: Sequence[str],
    features: Mapping[str, Tensor],
    reference: Mapping[str, Any] | None,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    feature: str = "2048",
) -> dict[str, float]:
    """FID / IS / KID of sample features against reference features (or FID against reference mu / sigma)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    out: dict[str, Any] = {}
    if "fid" in names:
        if "mu" in reference:
            ref = reference
        else:
            ref = gaussian_statistics(reference[feature])
        mine = gaussian_statistics(features[feature])
        out["fid"] = frechet_distance(mine["mu"], mine["sigma"], ref["mu"], ref["sigma"])
    if "isc" in names:
        out.update(isc_features_to_metric(features["logits_unbiased"], splits=isc_splits, shuffle=True, rng_seed=seed))
    if "kid" in names:
        out.update(
            kid_features_to_metric(
                features[feature], reference[feature], kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                rng_seed=seed, verbose=False,
            )
        )
    return {KEYS.get(k, k): float(v) for k, v in out.items()}


@dataclasses.dataclass
class Scorer:
    """FID / IS / KID of uint8 sample images against a reference, with one feature extractor: what `evaluate.py`
    and the FID callback both compute. `options`: compute_metrics' isc_splits, kid_subsets, kid_subset_size."""

    extractor: torch.nn.Module
    reference: Mapping[str, Any] | None
    feature: str = "2048"
    batch_size: int = 64
    options: dict[str, int] = dataclasses.field(default_factory=dict)

    def __call__(self, images: Tensor, names: Sequence[str], verbose: bool = True) -> dict[str, float]:
        features = extract_features(images, self.extractor, self.batch_size, verbose=verbose)
        return compute_metrics(names, features, self.reference, feature=self.feature, **self.options)


# ------------------------------------------------------------------------------------------- reference features


def cache_key(description: Mapping[str, Any], extractor: str = "inception-v3-compat") -> str:
    """A readable cache file name: dataset, split, resolution and extractor, plus a hash of the full description."""
    digest = hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = description.get("name", "data")
    return f"{name}-{description.get('split', 'train')}-{description.get('resolution', 'x')}px-{extractor}-{digest}"


def cached_features(path: Path, compute) -> dict[str, Tensor]:
    """Load features from `path`, or compute and save them there atomically (a crash leaves no partial file)."""
    if path.is_file():
        log.info("Reference features from cache %s", path)
        return load_file(path, "reference.cache_dir", what="reference feature cache")
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(features, tmp)
    os.replace(tmp, path)
    log.info("Reference features cached in %s", path)
    return features


def load_stats_file(path: str | Path) -> dict[str, Any]:
    """Reference statistics from a file: `.npz` with `mu` and `sigma` (the TTUR / pytorch-fid format), or a `.pt`
    written by this project's cache (features keyed by name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path} (reference.stats)")
    if path.suffix == ".npz":
        with np.load(path) as f:
            if not {"mu", "sigma"} <= set(f.files):
                raise ValueError(f"{path} holds {f.files}, expected 'mu' and 'sigma' (reference.stats)")
            return {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64)}

    data = load_file(path, "reference.stats", what="reference statistics file")
    if not isinstance(data, dict) or not (set(FEATURES) & set(data) or {"mu", "sigma"} <= set(data)):
        raise ValueError(f"{path} holds neither features (one of {list(FEATURES)}) nor 'mu' / 'sigma' (reference.stats)")
    return data


LOADER_KEYS = {"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}


def datamodule_reference_features(
    datamodule: Any,
    extractor: torch.nn.Module,
    split: str = "train",
    max_images: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    feature: str = "2048",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Inception features (layer `feature`) of a LightningDataModule's `split` set (`datamodule.<split>_set`, images in
    [-1, 1]), cached on disk under a key naming the data module, split, resolution and extractor.

    Returns the features and a description of what they were computed from (for metrics.json)."""
    hparams = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items() if k not in LOADER_KEYS}
    description = {
        "name": type(datamodule).__name__,
        "split": split,
        "resolution": hparams.get("image_size", "x"),
        "hparams": hparams,
        "max_images": max_images,
        "feature": str(feature),
    }
    key = cache_key(description, extractor.get_name() if hasattr(extractor, "get_name") else "inception-v3-compat")
    path = Path(cache_dir or Path(torch.hub.get_dir()) / "fidelity_cache").expanduser() / f"{key}.pt"
    description["cache"] = str(path)

    def compute() -> dict[str, Tensor]:
        try:
            datamodule.setup("fit" if split in ("train", "val") else "test")
        except (FileNotFoundError, OSError, RuntimeError) as e:
            raise FileNotFoundError(
                f"reference statistics need the {split} split of {description['name']}, which could not be loaded "
                f"({type(e).__name__}: {e}). Make the dataset available (see the data config), or give "
                f"reference.folder=<folder of images> or reference.stats=<.npz with mu and sigma>."
            ) from e
        dataset = getattr(datamodule, f"{split}_set", None)
        if dataset is None:
            raise ValueError(f"{description['name']} has no {split}_set after setup(); set reference.split (train, val or test)")
        images = images_of(dataset, max_images)
        log.info("Computing reference features of %d %s images of %s", len(images), split, description["name"])
        return {str(feature): extract_features(images, extractor, batch_size)[str(feature)]}

    return cached_features(path, compute), description


def folder_images(folder: str | Path) -> Dataset:
    """A folder of PNG / JPEG images as torch-fidelity reads it (RGB uint8 tensors)."""
    from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor
    from torch_fidelity.utils import glob_samples_paths

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder not found: {folder} (reference.folder)")
    files = glob_samples_paths(str(folder), False, "png,jpg,jpeg", verbose=False)
    if not files:
        raise FileNotFoundError(f"no .png / .jpg images in {folder} (reference.folder)")
    return ImagesPathDataset(files, TransformPILtoRGBTensor())
