"""Toy data for instant experiments: points in 1-D or 2-D (Gaussian mixtures, scikit-learn's two moons and swiss
roll), drawn once with a fixed seed and mapped into [-1, 1], the data range of the images (so the samplers'
clipping of x_0 applies unchanged)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

TOY_DATASETS = ("gaussian_mixture", "moons", "swiss_roll")
PLANAR = ("moons", "swiss_roll")  # datasets that exist in 2-D only


def gaussian_mixture(n: int, means: np.ndarray, stds: np.ndarray, weights: np.ndarray, rng: np.random.Generator):
    """n points of sum_k w_k N(m_k, s_k^2 I) and their components."""
    k = rng.choice(len(weights), size=n, p=weights)
    return means[k] + stds[k, None] * rng.standard_normal((n, means.shape[1])), k


def toy_points(dataset: str, n: int, seed: int, noise: float, means=None, stds=None, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(points [n, dim], labels [n]) of one toy dataset (label -1 where it has no classes), unscaled."""
    if dataset == "moons":
        from sklearn.datasets import make_moons

        return make_moons(n, noise=noise, random_state=seed)
    if dataset == "swiss_roll":
        from sklearn.datasets import make_swiss_roll

        x, _ = make_swiss_roll(n, noise=noise, random_state=seed)
        return x[:, [0, 2]], np.full(n, -1)
    return gaussian_mixture(n, means, stds, weights, np.random.default_rng(seed))


def fit_unit_box(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre, scale) mapping the points' bounding box into [-1, 1] with its aspect ratio kept: (x - c) / s."""
    lo, hi = x.min(0), x.max(0)
    return (lo + hi) / 2, float((hi - lo).max() / 2) or 1.0


class ToyDataModule(L.LightningDataModule):
    """Points [B, dim] (and labels [B]: the mixture component, the moon, or -1) for 1-D and 2-D experiments.

    dataset: gaussian_mixture (means [K][dim], stds [K], weights [K]; `noise` unused), moons or swiss_roll
    (scikit-learn's generators with Gaussian `noise`; 2-D only). The training set is mapped into [-1, 1] by one
    shift and scale (aspect ratio kept), and the validation set by the same map; `scale` and `centre` undo it."""

    num_classes = None  # no class-conditional training on toy data

    def __init__(
        self,
        dataset: str = "moons",
        data_shape: Sequence[int] = (2,),
        n_train: int = 10_000,
        n_val: int = 1_000,
        batch_size: int = 256,
        noise: float = 0.05,
        means: Sequence | None = None,
        stds: Sequence[float] | float = 0.1,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        data_shape, means, stds, weights = (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (data_shape, means, stds, weights))
        shape = tuple(data_shape) if isinstance(data_shape, Sequence) and not isinstance(data_shape, str) else None
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError(f"data.data_shape={data_shape!r} must be [dim] with dim >= 1 (e.g. [2] for points in the plane)")
        if dataset not in TOY_DATASETS:
            raise ValueError(f"data.dataset={dataset!r} must be one of {', '.join(TOY_DATASETS)}")
        dim = shape[0]
        if dataset in PLANAR and dim != 2:
            raise ValueError(f"data.dataset={dataset} is 2-D: set data.data_shape=[2] (or use dataset=gaussian_mixture)")
        for key, value in (("n_train", n_train), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r} must be a positive integer")
        if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0:
            raise ValueError(f"data.n_val={n_val!r} must be a non-negative integer")
        if batch_size > n_train:
            raise ValueError(f"data.batch_size={batch_size} is larger than data.n_train={n_train}")
        if noise < 0:
            raise ValueError(f"data.noise={noise} must be non-negative")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.mixture = self._check_mixture(means, stds, weights, dim) if dataset == "gaussian_mixture" else None
        self.save_hyperparameters()
        self.data_shape, self.batch_size, self.num_workers = shape, batch_size, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.centre, self.scale = np.zeros(dim), 1.0

    @staticmethod
    def _check_mixture(means, stds, weights, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if means is None or len(means) == 0:
            raise ValueError("data.means: give the component means of data.dataset=gaussian_mixture ([K][dim], e.g. [[-1], [1]])")
        try:
            m = np.asarray(means, dtype=np.float64).reshape(len(means), -1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.means={means!r} must be a list of K means, each a number or a list of {dim}") from e
        if m.shape[1] != dim:
            raise ValueError(f"data.means has {m.shape[1]}-D means but data.data_shape=[{dim}]")
        K = len(m)
        s = np.broadcast_to(np.asarray(stds, dtype=np.float64), (K,)).copy() if np.ndim(stds) == 0 else np.asarray(stds, np.float64)
        w = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, dtype=np.float64)
        if s.shape != (K,) or w.shape != (K,):
            raise ValueError(f"data.stds and data.weights need one value per component ({K} means); got {list(s)} and {list(w)}")
        if (s <= 0).any():
            raise ValueError(f"data.stds={list(s)} must be positive")
        if (w < 0).any() or not np.isclose(w.sum(), 1.0):
            raise ValueError(f"data.weights={list(w)} must be non-negative and sum to 1")
        return m, s, w

    def points(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n unscaled points and labels of this dataset."""
        hp = self.hparams
        mixture = dict(zip(("means", "stds", "weights"), self.mixture)) if self.mixture is not None else {}
        return toy_points(hp.dataset, n, seed, hp.noise, **mixture)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        x, y = self.points(hp.n_train + hp.n_val, hp.seed)
        self.centre, self.scale = fit_unit_box(x[: hp.n_train])
        x = torch.from_numpy((x - self.centre) / self.scale).float()
        y = torch.as_tensor(y, dtype=torch.long)
        self.train_set = TensorDataset(x[: hp.n_train], y[: hp.n_train])
        self.val_set = TensorDataset(x[hp.n_train :], y[hp.n_train :])

    def train_points(self) -> Tensor:
        """All training points [n_train, dim] in [-1, 1] (what sample plots are drawn against)."""
        self.setup()
        return self.train_set.tensors[0]

    def train_dataloader(self) -> DataLoader:
        # Stateful: its position and shuffling RNG go into the checkpoint, so a resumed run sees the same batches.
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
