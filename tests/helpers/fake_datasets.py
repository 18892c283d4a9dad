"""Tiny datasets fabricated in the official on-disk formats, so the real readers run offline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def make_cifar10(root: Path, n_train: int = 50, n_test: int = 10, seed: int = 0, constant: bool = False) -> tuple[np.ndarray, list[int]]:
    """`root`/cifar-10-batches-py with data_batch_1..5, test_batch and batches.meta as python pickles
    of {'data': uint8 [N, 3072] (R, G, B planes), 'labels': [...]}. Images are random, or with
    `constant` image k has every pixel equal to k. Returns all images [N, 3, 32, 32] (train then test)
    and labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    n = n_train + n_test
    if constant:
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, 32, 32)).copy()
    else:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = [int(i % 10) for i in range(n_train + n_test)]
    chunks = np.array_split(np.arange(n_train), 5)
    for k, idx in enumerate(chunks, start=1):
        _dump(folder / f"data_batch_{k}", images[idx], [labels[i] for i in idx], f"training batch {k} of 5")
    test = np.arange(n_train, n_train + n_test)
    _dump(folder / "test_batch", images[test], [labels[i] for i in test], "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)
    return images, labels


def _dump(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    entry = {"batch_label": name, "labels": labels, "data": images.reshape(len(images), -1), "filenames": [f"{i}.png" for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


CELEBA_INSIDE, CELEBA_OUTSIDE = 200, 20  # pixel values inside / outside the DDIM face crop


def make_celeba(root: Path, splits: tuple[int, int, int] = (6, 2, 2)) -> list[str]:
    """`root`/celeba in torchvision's layout: img_align_celeba/*.jpg (178x218, CELEBA_INSIDE inside the
    128x128 crop at rows 57-184, columns 25-152, CELEBA_OUTSIDE elsewhere), list_eval_partition.txt,
    identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt."""
    folder = Path(root) / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    names, partition = [], []
    for split, n in enumerate(splits):
        for _ in range(n):
            names.append(f"{len(names) + 1:06d}.jpg")
            partition.append(split)
    pixels = np.full((218, 178, 3), CELEBA_OUTSIDE, dtype=np.uint8)
    pixels[57:185, 25:153] = CELEBA_INSIDE
    for name in names:
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
    attrs = [f"Attr_{i}" for i in range(40)]
    landmarks = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y", "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y"]
    write = lambda file, lines: (folder / file).write_text("\n".join(lines) + "\n")  # noqa: E731
    write("list_eval_partition.txt", [f"{n} {s}" for n, s in zip(names, partition)])
    write("identity_CelebA.txt", [f"{n} {i % 3 + 1}" for i, n in enumerate(names)])
    write("list_attr_celeba.txt", [str(len(names)), " ".join(attrs)] + [n + " " + " ".join(["-1", " 1"][i % 2] for i in range(40)) for n in names])
    write("list_bbox_celeba.txt", [str(len(names)), "image_id x_1 y_1 width height"] + [f"{n}  95  71 226 313" for n in names])
    write("list_landmarks_align_celeba.txt", [str(len(names)), " ".join(landmarks)] + [f"{n}  69 109 106 113 77 142 73 152 108 154" for n in names])
    return names


def make_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (24, 20), seed: int = 0) -> dict[str, list[Path]]:
    """`root`/<class>/... images of `size` (w, h); every third one in a nested subfolder, formats cycling
    png / jpg / webp. Returns the files per class."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for c, n in classes.items():
        out[c] = []
        for i in range(n):
            sub = Path(root) / c / ("nested/deeper" if i % 3 == 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{c}_{i}.{('png', 'jpg', 'webp')[i % 3]}"
            Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, **({"lossless": True} if path.suffix == ".webp" else {}))
            out[c].append(path)
    return out
