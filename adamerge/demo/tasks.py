"""The demo zoos' tasks: real images from scikit-learn, scikit-image and Fashion-MNIST, cut and resized.

Each builder returns ``(train, test, class_names)`` with uint8 NHWC images; every random choice comes from the
generator it is given, so :func:`make_task_data` is a pure function of its arguments (the zoo build relies on
it being bit-reproducible). The tasks themselves are described in :mod:`adamerge.demo.zoo`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TaskSplit = tuple[np.ndarray, np.ndarray]  # uint8 images [N, R, R, 3], int64 labels [N]


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Antialiased bilinear resize of uint8 NHWC images (torch: deterministic on every platform)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-8)).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return _rgb(getattr(skimage.data, name)())


def _sklearn_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    return {"china": _rgb(images[0]), "flower": _rgb(images[1])}


def _crop(image: np.ndarray, size: int, region: tuple[float, float, float, float], rng: np.random.Generator,
          resolution: int) -> np.ndarray:
    h, w = image.shape[:2]
    r0, r1, c0, c1 = int(region[0] * h), int(region[1] * h), int(region[2] * w), int(region[3] * w)
    size = min(size, r1 - r0, c1 - c0)
    y = int(rng.integers(r0, r1 - size + 1))
    x = int(rng.integers(c0, c1 - size + 1))
    return _resize(image[None, y : y + size, x : x + size], resolution)[0]


def _patch_source_task(sources: list[np.ndarray], n: int, region: tuple[float, float, float, float],
                       rng: np.random.Generator, resolution: int, sizes: tuple[int, int]) -> TaskSplit:
    """Balanced "which image is this patch from" split: ``n // len(sources)`` random crops per image."""
    per = n // len(sources)
    images, labels = [], []
    for label, image in enumerate(sources):
        for _ in range(per):
            images.append(_crop(image, int(rng.integers(sizes[0], sizes[1] + 1)), region, rng, resolution))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


_LEFT, _RIGHT = (0.0, 1.0, 0.0, 0.7), (0.0, 1.0, 0.7, 1.0)
_TOP, _BOTTOM = (0.0, 0.7, 0.0, 1.0), (0.7, 1.0, 0.0, 1.0)


def _digits(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = _resize(np.stack([(d.images * (255.0 / 16.0)).round().astype(np.uint8)] * 3, -1), resolution)
    labels = d.target.astype(np.int64)
    order = rng.permutation(len(labels))
    test, train = order[:test_size], order[test_size : test_size + train_size]
    return (images[train], labels[train]), (images[test], labels[test]), [str(i) for i in range(10)]


_TEXTURE_IMAGES = ("brick", "grass", "gravel", "moon", "coins", "clock", "text", "camera")


def _named_patch_task(names: tuple[str, ...], sizes: tuple[int, int], resolution: int, train_size: int,
                      test_size: int, rng: np.random.Generator):
    """Which skimage image a patch comes from; train patches from the left, test from the right."""
    sources = [_skimage(n) for n in names]
    train = _patch_source_task(sources, train_size, _LEFT, rng, resolution, sizes)
    test = _patch_source_task(sources, test_size, _RIGHT, rng, resolution, sizes)
    return train, test, list(names)


def _textures(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    # Small crops (20-48 px) keep little context, which is what makes this hard for pretrained features.
    return _named_patch_task(_TEXTURE_IMAGES, (20, 48), resolution, train_size, test_size, rng)


_PHOTO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def _photo_sources() -> dict[str, np.ndarray]:
    """The six colour photos (four from scikit-image, two from scikit-learn), by name."""
    return {**{n: _skimage(n) for n in _PHOTO_IMAGES}, **_sklearn_photos()}


def _photos(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    photos = _photo_sources()
    names, sources = list(photos), list(photos.values())
    sizes = (48, 128)
    train = _patch_source_task(sources, train_size, _TOP, rng, resolution, sizes)
    test = _patch_source_task(sources, test_size, _BOTTOM, rng, resolution, sizes)
    return train, test, names


_SCALE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "brick", "grass",
                 "gravel", "camera")
_SCALE_SIZES = (16, 48, 144)


def _scale(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    sources = [_skimage(n) for n in _SCALE_IMAGES] + list(_sklearn_photos().values())

    def split(n: int, region: tuple[float, float, float, float]) -> TaskSplit:
        labels = np.arange(n, dtype=np.int64) % len(_SCALE_SIZES)  # balanced classes
        images = [
            _crop(sources[int(rng.integers(len(sources)))], _SCALE_SIZES[c], region, rng, resolution) for c in labels
        ]
        return np.stack(images), labels

    return split(train_size, _LEFT), split(test_size, _RIGHT), [f"{s}px" for s in _SCALE_SIZES]


_SCIENCE_IMAGES = ("hubble_deep_field", "immunohistochemistry", "retina", "cell")


def _science(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    # Astronomy, histology, ophthalmology, microscopy: small crops, far from ImageNet's photos.
    return _named_patch_task(_SCIENCE_IMAGES, (16, 40), resolution, train_size, test_size, rng)


_BLUR_SIGMAS = (0.0, 0.7, 1.4)


def _blur(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    """How blurred a colour-photo patch is: Gaussian blur of sigma 0, 0.7 or 1.4 px at the final resolution.

    Train patches from the top 70 % of each photo, test patches from the bottom 30 %.
    """
    from scipy.ndimage import gaussian_filter

    sources = list(_photo_sources().values())

    def split(n: int, region: tuple[float, float, float, float]) -> TaskSplit:
        labels = np.arange(n, dtype=np.int64) % len(_BLUR_SIGMAS)  # balanced classes
        images = []
        for c in labels:
            patch = _crop(sources[int(rng.integers(len(sources)))], int(rng.integers(48, 129)), region, rng, resolution)
            sigma = _BLUR_SIGMAS[c]
            if sigma > 0:
                patch = gaussian_filter(patch.astype(np.float64), sigma=(sigma, sigma, 0)).round().clip(0, 255)
            images.append(patch.astype(np.uint8))
        return np.stack(images), labels

    return split(train_size, _TOP), split(test_size, _BOTTOM), [f"sigma{s}" for s in _BLUR_SIGMAS]


# Fashion-MNIST ships in Debian's `dataset-fashion-mnist` package (IDX files); the hubs are not reachable here.
FASHION_MNIST_DIR = Path(os.environ.get("ADAMERGE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped): magic with the number of dimensions, the sizes, uint8 data."""
    import gzip

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(resolution: int, train_size: int, test_size: int, rng: np.random.Generator):
    files = {split: (FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz")
             for split in ("train", "t10k")}
    missing = [str(f) for pair in files.values() for f in pair if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo task 'fashion' needs Fashion-MNIST, missing {missing}: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set ADAMERGE_FASHION_MNIST_DIR to a folder with its IDX files"
        )

    def split(name: str, n: int) -> TaskSplit:
        images, labels = (_read_idx(f) for f in files[name])
        chosen = np.sort(rng.choice(len(labels), size=min(n, len(labels)), replace=False))
        return _resize(np.stack([images[chosen]] * 3, -1), resolution), labels[chosen].astype(np.int64)

    return split("train", train_size), split("t10k", test_size), list(_FASHION_CLASSES)


TASK_BUILDERS = {"digits": _digits, "textures": _textures, "photos": _photos, "science": _science, "scale": _scale,
                  "blur": _blur, "fashion": _fashion}


def make_task_data(task: str, resolution: int, train_size: int, test_size: int, seed: int
                   ) -> tuple[TaskSplit, TaskSplit, list[str]]:
    """(train, test, class names) for one demo task; seeded per task so adding a task changes no other."""
    seed_seq = np.random.SeedSequence([seed, int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)])
    return TASK_BUILDERS[task](resolution, train_size, test_size, np.random.default_rng(seed_seq))
