"""Real image data for the vision setting: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale images (16 grey levels,
UCI "Optical Recognition of Handwritten Digits" test set) inside the wheel, so nothing
is downloaded. The images are split **first** into disjoint, stratified, seeded
train / search / validation / test sets (one image never appears in two splits, in any domain), and
only then is each domain's fixed transform applied to every split.

Domains (every transform is a pure function of the image and its dataset index, so the
splits are the same on every machine):

* ``clean``    -- the images as they are (the base model's training domain).
* ``rotated``  -- rotated ``rotation`` degrees (default 30) counter-clockwise about the
  image centre (``scipy.ndimage.rotate``, bilinear, same 8x8 frame, zero fill).
* ``noisy``    -- additive Gaussian pixel noise, ``x + N(0, noise_std^2)`` clipped to
  [0, 1]; the noise of image ``i`` is drawn from ``numpy.random.default_rng([seed,
  1, i])``.
* ``occluded`` -- an ``occlusion`` x ``occlusion`` square of pixels set to 0 at a position
  drawn uniformly per image from ``numpy.random.default_rng([seed, 2, i])``.

Pixel values are scaled to [0, 1] (raw value / 16).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "search", "validation", "test")
DOMAINS = ("clean", "rotated", "noisy", "occluded")
SKILL_DOMAINS = ("rotated", "noisy", "occluded")  # the K = 3 experts' domains, in skill order
_DOMAIN_CODE = {"clean": 0, "noisy": 1, "occluded": 2, "rotated": 3}


@dataclass(frozen=True)
class DigitsSplit:
    """One split of the digits images, before any domain transform.

    Attributes:
        images: float32 array (N, 8, 8), pixel values in [0, 1].
        labels: int64 array (N,), digit classes 0..9.
        ids: int64 array (N,), the images' indices in ``load_digits()`` (unique).
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class DomainSplit:
    """One (domain, split) set as model-ready tensors.

    Attributes:
        domain, split: names (see :data:`DOMAINS`, :data:`SPLITS`).
        x: float32 tensor (N, 1, 8, 8), pixel values in [0, 1].
        y: int64 tensor (N,).
        ids: int64 tensor (N,), indices into ``load_digits()``.
    """

    domain: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def sample_ids(self) -> list[str]:
        """Stable per-sample ids ``"<domain>/<split>/<dataset index>"``."""
        return [f"{self.domain}/{self.split}/{int(i)}" for i in self.ids]


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 bundled digits: images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_digits(seed: int, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
                 validation: float = 0.1) -> dict[str, DigitsSplit]:
    """Disjoint, class-stratified train / search / validation / test split of the digits images.

    Args:
        seed: the split seed (``numpy.random.default_rng(seed)`` permutes each class).
        fractions: (train, search, test) fractions, each > 0, summing to 1.
        validation: the fraction of all images moved from the end of each class's train
            part to ``validation`` (chooses the final model; never reported). ``search`` and
            ``test`` are the same images whatever its value.
    Returns:
        ``{"train": DigitsSplit, "search": ..., "validation": ..., "test": ...}``; their
        ``ids`` are disjoint and together cover all 1,797 images.
    Raises:
        ValueError: if ``fractions`` is not three positive numbers summing to 1, or
            ``validation`` is not in (0, train fraction).
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions!r}")
    if not 0 < validation < fractions[0]:
        raise ValueError(f"validation must be in (0, {fractions[0]}) (taken from train), got {validation!r}")
    images, labels = load_digits_array()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(fractions[0] * len(idx))
        n_search = round(fractions[1] * len(idx))
        n_val = round(validation * len(idx))
        parts["train"].append(idx[:n_train - n_val])
        parts["validation"].append(idx[n_train - n_val:n_train])
        parts["search"].append(idx[n_train:n_train + n_search])
        parts["test"].append(idx[n_train + n_search:])
    out = {}
    for s in SPLITS:
        ids = np.sort(np.concatenate(parts[s]))
        out[s] = DigitsSplit(images[ids], labels[ids], ids.astype(np.int64))
    return out


def transform(images: np.ndarray, ids: np.ndarray, domain: str, *, seed: int,
              noise_std: float = 0.35, occlusion: int = 4, rotation: float = 30.0) -> np.ndarray:
    """Apply one domain's fixed transform to images (see the module docstring).

    Args:
        images: float32 (N, 8, 8) in [0, 1].
        ids: int (N,) dataset indices; they key the per-image random draws.
        domain: one of :data:`DOMAINS`.
        seed: the transform seed.
        noise_std: std of the ``noisy`` domain's pixel noise (pixel units, [0, 1] scale).
        occlusion: side in pixels of the ``occluded`` domain's black square (1..8).
        rotation: the ``rotated`` domain's angle in degrees (counter-clockwise).
    Returns:
        float32 (N, 8, 8) in [0, 1]; a new array.
    Raises:
        ValueError: unknown domain, mismatched shapes, or bad noise/occlusion parameters.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if images.ndim != 3 or images.shape[1:] != (8, 8) or len(ids) != len(images):
        raise ValueError(f"images must be (N, 8, 8) with N ids, got {images.shape} and {len(ids)} ids")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 1 <= occlusion <= 8:
        raise ValueError(f"occlusion must be in 1..8 pixels, got {occlusion}")
    x = np.array(images, dtype=np.float32, copy=True)
    if domain == "clean":
        return x
    if domain == "rotated":
        from scipy import ndimage

        out = ndimage.rotate(x, rotation, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
    code = _DOMAIN_CODE[domain]
    for j, i in enumerate(ids):
        rng = np.random.default_rng([seed, code, int(i)])
        if domain == "noisy":
            x[j] = np.clip(x[j] + rng.normal(0.0, noise_std, size=(8, 8)), 0.0, 1.0)
        else:  # occluded
            r, c = rng.integers(0, 8 - occlusion + 1, size=2)
            x[j, r:r + occlusion, c:c + occlusion] = 0.0
    return x


def build_domains(domains: tuple[str, ...] = DOMAINS, *, split_seed: int = 0,
                  transform_seed: int = 0, noise_std: float = 0.35, occlusion: int = 4,
                  rotation: float = 30.0,
                  fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
                  ) -> dict[str, dict[str, DomainSplit]]:
    """All (domain, split) sets: split the images first, then transform each split.

    Returns:
        ``{domain: {split: DomainSplit}}``. For every domain the ``ids`` of a split are
        the same, and different splits never share an id.
    """
    raw = split_digits(split_seed, fractions)
    out: dict[str, dict[str, DomainSplit]] = {}
    for d in domains:
        out[d] = {}
        for s, part in raw.items():
            x = transform(part.images, part.ids, d, seed=transform_seed, noise_std=noise_std,
                          occlusion=occlusion, rotation=rotation)
            out[d][s] = DomainSplit(d, s, torch.from_numpy(x).unsqueeze(1),
                                    torch.from_numpy(part.labels), torch.from_numpy(part.ids))
    return out


def check_disjoint(data: Mapping[str, Mapping[str, DomainSplit]]) -> None:
    """Raise ValueError if any image id appears in two different splits (any domains)."""
    owner: dict[int, str] = {}
    for d, splits in data.items():
        for s, ds in splits.items():
            for i in ds.ids.tolist():
                if owner.setdefault(i, s) != s:
                    raise ValueError(f"image {i} is in split {owner[i]!r} and in {d}/{s}")
