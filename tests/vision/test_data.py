"""Data: disjoint seeded splits of the real digits, deterministic per-image domain transforms."""

from __future__ import annotations

import numpy as np
import pytest

from cycleqd.vision.data import (
    DOMAINS,
    build_domains,
    check_disjoint,
    load_digits_array,
    split_digits,
    transform,
)


def test_splits_are_disjoint_stratified_and_cover_all_images():
    sp = split_digits(0)
    ids = [set(sp[s].ids.tolist()) for s in ("train", "search", "validation", "test")]
    print("vision sizes train/search/validation/test:", [len(i) for i in ids])
    assert all(not ids[a] & ids[b] for a in range(4) for b in range(a + 1, 4))
    assert len(ids[0] | ids[1] | ids[2] | ids[3]) == 1797
    for s in ("train", "search", "validation", "test"):
        counts = np.bincount(sp[s].labels, minlength=10)
        assert counts.min() > 0.8 * counts.mean()  # stratified: every class present, balanced
    assert len(sp["train"].ids) == pytest.approx(0.4 * 1797, abs=10)
    assert len(sp["validation"].ids) == pytest.approx(0.1 * 1797, abs=10)
    images, labels = load_digits_array()
    np.testing.assert_array_equal(sp["test"].images, images[sp["test"].ids])
    np.testing.assert_array_equal(sp["test"].labels, labels[sp["test"].ids])


def test_split_seed_changes_the_split_and_is_reproducible():
    a, b, c = split_digits(0), split_digits(0), split_digits(1)
    np.testing.assert_array_equal(a["test"].ids, b["test"].ids)
    assert not np.array_equal(a["test"].ids, c["test"].ids)


def test_every_domain_uses_the_same_disjoint_image_split():
    data = build_domains()
    check_disjoint(data)
    for d in DOMAINS:
        for s in ("train", "search", "test"):
            np.testing.assert_array_equal(data[d][s].ids, data["clean"][s].ids)
            x = data[d][s].x
            assert x.shape[1:] == (1, 8, 8) and x.dtype.__str__() == "torch.float32"
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_check_disjoint_catches_a_leak():
    data = build_domains(("clean", "noisy"))
    leaked = dict(data)
    leaked["noisy"] = dict(data["noisy"])
    leaked["noisy"]["test"] = data["noisy"]["train"].__class__(
        "noisy", "test", data["noisy"]["train"].x, data["noisy"]["train"].y, data["noisy"]["train"].ids)
    with pytest.raises(ValueError, match="is in split"):
        check_disjoint(leaked)


def test_transforms_are_per_image_and_independent_of_batching():
    images, _ = load_digits_array()
    ids = np.arange(40)
    for d in ("noisy", "occluded", "rotated"):
        whole = transform(images[:40], ids, d, seed=0)
        parts = np.concatenate([transform(images[:40][i:i + 7], ids[i:i + 7], d, seed=0)
                                for i in range(0, 40, 7)])
        np.testing.assert_array_equal(whole, parts)
        assert not np.allclose(whole, images[:40])
    np.testing.assert_array_equal(transform(images[:5], ids[:5], "clean", seed=0), images[:5])
    assert not np.array_equal(transform(images[:5], ids[:5], "noisy", seed=0),
                              transform(images[:5], ids[:5], "noisy", seed=1))


def test_occlusion_blacks_out_a_square_and_rotation_keeps_mass():
    images, _ = load_digits_array()
    ids = np.arange(20)
    occ = transform(images[:20], ids, "occluded", seed=0, occlusion=4)
    for j in range(20):
        zero = np.argwhere(occ[j] == 0)
        # some 4x4 window is all zero
        assert any((occ[j, r:r + 4, c:c + 4] == 0).all() for r in range(5) for c in range(5))
        assert len(zero) >= 16
    rot = transform(images[:20], ids, "rotated", seed=0, rotation=30.0)
    ratio = rot.sum() / images[:20].sum()
    assert 0.8 < ratio < 1.1  # bilinear rotation in the same frame keeps most of the ink


@pytest.mark.parametrize("kw, msg", [
    (dict(domain="blurred"), "domain must be one of"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(occlusion=9), "occlusion"),
])
def test_bad_transform_arguments_raise(kw, msg):
    images, _ = load_digits_array()
    args = dict(domain="noisy", seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        transform(images[:3], np.arange(3), args.pop("domain"), **args)


def test_bad_fractions_raise():
    with pytest.raises(ValueError, match="fractions"):
        split_digits(0, (0.5, 0.5, 0.5))
