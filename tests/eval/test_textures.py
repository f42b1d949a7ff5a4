"""The built-in textures: a balanced, reproducible, stamped ImageFolder tree whose class is the pattern's kind,
never its colour (the writer's atomicity and races are tested through the scenes, tests/eval/test_scenes.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from harness.config.loader import ConfigError
from harness.eval.generated import STAMP_NAME
from harness.eval.textures import FORMAT_VERSION, TEXTURE_CLASSES, render_texture, texture_rng, write_textures


def _render_set(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels, boolean patterns N x 32 x 32) straight from the generator."""
    images, labels, patterns = [], [], []
    for c in range(len(TEXTURE_CLASSES)):
        for i in range(per_class):
            image, on = render_texture(c, texture_rng(0, split, c, i), 32)
            images.append(image), labels.append(c), patterns.append(on)
    return np.stack(images), np.array(labels), np.stack(patterns)


def test_tree_is_balanced_stamped_and_reproducible(tmp_path: Path) -> None:
    root = write_textures(tmp_path / "t", per_class_train=3, per_class_val=2, seed=1)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(TEXTURE_CLASSES)
        assert all(len(list((root / split / c).iterdir())) == count for c in TEXTURE_CLASSES)
    assert json.loads((root / STAMP_NAME).read_text()) == {
        "set": "textures", "format": FORMAT_VERSION, "classes": list(TEXTURE_CLASSES), "per_class_train": 3,
        "per_class_val": 2, "size": 32, "seed": 1}
    digests = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.png")}
    again = write_textures(tmp_path / "u", per_class_train=3, per_class_val=2, seed=1)
    assert digests == {str(p.relative_to(again)): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in again.rglob("*.png")}
    assert len(set(digests.values())) == len(digests)  # no image twice
    # train image i does not depend on the set's size
    first, _ = render_texture(2, texture_rng(1, "train", 2, 1), 32)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(root / "train" / TEXTURE_CLASSES[2] / "00001.png")), first)


def test_refuses_to_overwrite_a_scenes_tree_or_other_data(tmp_path: Path) -> None:
    from harness.eval.scenes import write_scenes

    scenes = write_scenes(tmp_path / "s", per_class_train=1, per_class_val=1, size=32)
    with pytest.raises(ConfigError, match=r"not generated textures \(train/arrow, train/crescent, train/cross\)"):
        write_textures(scenes, per_class_train=1, per_class_val=1)
    assert (scenes / "train" / "arrow" / "00000.png").exists()


def _nearest_neighbour_accuracy(train: np.ndarray, train_y: np.ndarray, val: np.ndarray, val_y: np.ndarray) -> float:
    distances = torch.cdist(torch.from_numpy(val).flatten(1).double(), torch.from_numpy(train).flatten(1).double())
    return float((train_y[distances.argmin(1).numpy()] == val_y).mean() * 100)


def test_colour_says_nothing_of_the_class() -> None:
    """Raw-pixel 1-NN and 1-NN on the hue of an image's mean colour (its direction from grey) are near chance
    (12.5%; measured 20% and 8% on 320/160): the colour fields are random and complementary, so no class owns a colour. (How FAR from grey
    the mean is does say something, 26% by 1-NN: it grows with the pattern's density, not its colour.)"""
    train, train_y, _ = _render_set("train", 40)
    val, val_y, _ = _render_set("val", 20)
    pixels = [x.astype(np.float64) / 255 for x in (train, val)]
    assert _nearest_neighbour_accuracy(pixels[0], train_y, pixels[1], val_y) < 25  # measured 20%
    means = [p.mean((1, 2)) - 0.5 for p in pixels]
    assert np.abs(np.concatenate(means)).max() < 0.2  # every image is grey on average
    hues = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in means]
    assert _nearest_neighbour_accuracy(hues[0], train_y, hues[1], val_y) < 20  # measured 8%


def _pattern_statistics(on: np.ndarray) -> list[float]:
    """Five colour-free, rotation- and shift-tolerant statistics of a boolean pattern."""
    f = on.astype(np.float64)
    gy, gx = np.gradient(f)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy + 1e-9)  # one orientation (stripes) or several
    edges = (np.diff(f, axis=0) != 0).mean() + (np.diff(f, axis=1) != 0).mean()
    return [f.mean(), edges, np.log1p(ndi.label(on)[1]), np.log1p(ndi.label(~on)[1]), coherence]


def test_the_pattern_alone_names_the_class_and_stands_out() -> None:
    """Learnable without colour: a logistic regression on five statistics of the boolean pattern (its
    density, edges, pieces of either side, orientation coherence) names the class (measured 91% on
    320/160, chance 12.5%); and the two sides of the pattern differ in colour at almost every pixel (90% of pixels are >0.47 in RGB from the nearest pixel across; 0.25 asserted)."""
    _, train_y, train_on = _render_set("train", 40)
    val, val_y, val_on = _render_set("val", 20)
    scaler = StandardScaler().fit([_pattern_statistics(on) for on in train_on])
    model = LogisticRegression(max_iter=2000).fit(scaler.transform([_pattern_statistics(on) for on in train_on]),
                                                  train_y)
    accuracy = (model.predict(scaler.transform([_pattern_statistics(on) for on in val_on])) == val_y).mean()
    assert accuracy > 0.8, accuracy

    pixels = val.astype(np.float64) / 255
    across = []  # colour distance between a pixel and its nearest pixel on the other side of the pattern
    for image, on in zip(pixels[::8], val_on[::8]):
        if on.all() or not on.any():
            continue
        nearest_off = ndi.distance_transform_edt(on, return_distances=False, return_indices=True)
        nearest_on = ndi.distance_transform_edt(~on, return_distances=False, return_indices=True)
        nearest = np.where(on[None], nearest_off, nearest_on)
        across.append(np.linalg.norm(image - image[nearest[0], nearest[1]], axis=-1).ravel())
    assert np.percentile(np.concatenate(across), 10) > 0.25, np.percentile(np.concatenate(across), [5, 10, 50])
