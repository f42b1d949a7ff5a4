"""The built-in generated labelled scenes: an ImageFolder tree that is balanced, reproducible, written
atomically, and whose class is the object's shape, not its colour or place."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config.loader import ConfigError
from harness.eval import scenes
from harness.eval.scenes import SCENE_CLASSES, STAMP_NAME, render_scene, scene_rng, write_scenes


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def _render_set(split: str, per_class: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N x H x W x 3 uint8, labels, object coverage N x H x W) straight from the generator, no disk."""
    images, labels, masks = [], [], []
    for c in range(len(SCENE_CLASSES)):
        for i in range(per_class):
            image, mask = render_scene(c, scene_rng(0, split, c, i), size)
            images.append(image), labels.append(c), masks.append(mask)
    return np.stack(images), np.array(labels), np.stack(masks)


def test_tree_is_balanced_and_stamped(tmp_path: Path) -> None:
    root = write_scenes(tmp_path / "scenes", per_class_train=3, per_class_val=2, size=32, seed=5)
    assert root == tmp_path / "scenes"
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(SCENE_CLASSES)
        for name in SCENE_CLASSES:
            files = sorted((root / split / name).iterdir())
            assert [f.name for f in files] == [f"{i:05d}.png" for i in range(count)]
    stamp = json.loads((root / STAMP_NAME).read_text())
    assert stamp == {"format": scenes.FORMAT_VERSION, "classes": list(SCENE_CLASSES), "per_class_train": 3,
                     "per_class_val": 2, "size": 32, "seed": 5}
    assert [p.name for p in tmp_path.iterdir()] == ["scenes"]  # no temporary folder left beside it


def test_finished_tree_is_reused_and_a_stale_one_rewritten(tmp_path: Path) -> None:
    root = write_scenes(tmp_path / "s", per_class_train=2, per_class_val=1, size=32)
    marker = root / "train" / "disc" / "marker.txt"
    marker.write_text("kept while the stamp matches")
    write_scenes(root, per_class_train=2, per_class_val=1, size=32)
    assert marker.exists()

    write_scenes(root, per_class_train=2, per_class_val=3, size=32)  # other parameters: a new tree
    assert not marker.exists()
    assert len(list((root / "val" / "disc").iterdir())) == 3
    assert json.loads((root / STAMP_NAME).read_text())["per_class_val"] == 3

    marker.write_text("a tree without its stamp is not trusted")
    (root / STAMP_NAME).unlink()
    write_scenes(root, per_class_train=2, per_class_val=3, size=32)
    assert not marker.exists() and (root / STAMP_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_crash_never_leaves_a_tree_that_looks_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_scenes(tmp_path / "s", per_class_train=1, per_class_val=1, size=32)
    before = _digests(root)
    real, calls = scenes.render_scene, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(scenes, "render_scene", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_scenes(root, per_class_train=4, per_class_val=1, size=32)
    assert _digests(root) == before  # the old, complete tree, with its old stamp
    assert json.loads((root / STAMP_NAME).read_text())["per_class_train"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    with pytest.raises(RuntimeError, match="disk full"):
        write_scenes(tmp_path / "fresh", size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def _write_small(root: Path) -> str:
    return str(write_scenes(root, per_class_train=3, per_class_val=2, size=32))


def test_racing_writers_leave_one_finished_tree(tmp_path: Path) -> None:
    """Ranks that all call write_scenes at once (over a stale tree) get the same complete tree, no leftovers."""
    (tmp_path / "s" / "train").mkdir(parents=True)  # stale: no stamp
    context = multiprocessing.get_context("fork")
    with context.Pool(3) as pool:
        assert pool.map(_write_small, [tmp_path / "s"] * 3) == [str(tmp_path / "s")] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert _digests(tmp_path / "s") == _digests(Path(_write_small(tmp_path / "reference")))


def test_refuses_to_replace_a_folder_that_is_not_scenes(tmp_path: Path) -> None:
    (tmp_path / "mine" / "train" / "cats").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match=r"not generated scenes \(notes.txt, train/cats\).*remove them or pick"):
        write_scenes(tmp_path / "mine", per_class_train=1, per_class_val=1, size=32)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(ConfigError, match="size must be an integer >= 16"):
        write_scenes(tmp_path / "x", size=8)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    kwargs = dict(per_class_train=2, per_class_val=1, size=32)
    a = _digests(write_scenes(tmp_path / "a", seed=3, **kwargs))
    assert a == _digests(write_scenes(tmp_path / "b", seed=3, **kwargs))
    other = _digests(write_scenes(tmp_path / "c", seed=4, **kwargs))
    assert a.keys() == other.keys() and all(a[k] != other[k] for k in a)


def test_val_is_drawn_apart_from_train() -> None:
    train, _, _ = _render_set("train", 4, size=32)
    val, _, _ = _render_set("val", 4, size=32)
    digests = {hashlib.sha256(x.tobytes()).hexdigest() for x in np.concatenate([train, val])}
    assert len(digests) == len(train) + len(val)  # no image twice, within or across splits
    # an image does not depend on how many are written: train image i is the same for any set size
    first, _ = render_scene(3, scene_rng(0, "train", 3, 2), 32)
    assert np.array_equal(first, train[3 * 4 + 2])


def _nearest_neighbour_accuracy(train: torch.Tensor, train_y: np.ndarray, val: torch.Tensor,
                                val_y: np.ndarray) -> float:
    nearest = torch.cdist(val.flatten(1), train.flatten(1)).argmin(1).numpy()
    return float((train_y[nearest] == val_y).mean() * 100)


def test_class_is_not_readable_from_raw_pixels() -> None:
    """Raw-pixel 1-NN (and 1-NN on an 8x8 colour layout: colour and position) stays near 10% chance.

    Measured on 1,000/500 images: 1-NN 11.6%, 20-NN 15.4%, 8x8 1-NN 10.4%.
    """
    train, train_y, _ = _render_set("train", 20)
    val, val_y, _ = _render_set("val", 10)
    to_tensor = lambda x: torch.from_numpy(x).float().div(255).permute(0, 3, 1, 2)  # noqa: E731
    train_t, val_t = to_tensor(train), to_tensor(val)
    assert _nearest_neighbour_accuracy(train_t, train_y, val_t, val_y) < 22
    pooled = torch.nn.functional.adaptive_avg_pool2d
    assert _nearest_neighbour_accuracy(pooled(train_t, 8), train_y, pooled(val_t, 8), val_y) < 22


def _hu_moments(masks: np.ndarray) -> np.ndarray:
    """Hu's first four moment invariants of each coverage mask (invariant to position, scale, rotation)."""
    size = masks.shape[-1]
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    m = masks.sum((1, 2))
    x = xx - (masks * xx).sum((1, 2))[:, None, None] / m[:, None, None]
    y = yy - (masks * yy).sum((1, 2))[:, None, None] / m[:, None, None]

    def eta(p: int, q: int) -> np.ndarray:
        return (masks * x**p * y**q).sum((1, 2)) / m ** (1 + (p + q) / 2)

    n20, n02, n11, n30, n03, n21, n12 = eta(2, 0), eta(0, 2), eta(1, 1), eta(3, 0), eta(0, 3), eta(2, 1), eta(1, 2)
    return np.stack([n20 + n02, (n20 - n02) ** 2 + 4 * n11**2, (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
                     (n30 + n12) ** 2 + (n21 + n03) ** 2], axis=1)


def test_shape_is_the_class_and_stands_out() -> None:
    """Learnable: the object's silhouette alone names the class (1-NN on Hu moment invariants, measured
    97% on 500/300), and the object differs in colour from the background right around it."""
    _, train_y, train_masks = _render_set("train", 20)
    val, val_y, val_masks = _render_set("val", 10)
    descriptors = [np.log(np.abs(_hu_moments(m)) + 1e-12) for m in (train_masks, val_masks)]
    spread = descriptors[0].std(0)
    train_d, val_d = (torch.from_numpy(d / spread) for d in descriptors)
    assert _nearest_neighbour_accuracy(train_d, train_y, val_d, val_y) > 85

    covered = torch.from_numpy(val_masks > 0.01)[:, None].float()
    around = (torch.nn.functional.max_pool2d(covered, 7, 1, 3) - covered)[:, 0].bool().numpy()
    inside = val_masks > 0.99
    assert inside.sum((1, 2)).min() > 100  # at least 10 x 10 px of solid object
    pixels = val.astype(np.float64) / 255
    contrast = [np.linalg.norm(p[i].mean(0) - p[a].mean(0)) for p, i, a in zip(pixels, inside, around)]
    assert np.percentile(contrast, 5) > 0.3, np.percentile(contrast, [0, 5, 50])
