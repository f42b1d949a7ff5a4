"""Labelled folders and the evaluation transforms: paths resolved or refused in one line, transforms equal to
an independent PIL + numpy computation, ImageFolder labels matching the folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config.loader import ConfigError
from harness.eval import data
from harness.eval.data import (
    IMAGENET_MEAN, IMAGENET_STD, EvalTransforms, check_same_classes, default_sizes, eval_transform,
    labelled_dataset, resolve_labelled, train_transform,
)
from harness.eval import scenes as scenes_module
from harness.eval import textures
from harness.eval.scenes import FORMAT_VERSION, SCENE_CLASSES, write_scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("eval-data") / "scenes", per_class_train=3, per_class_val=2)


def _reference(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Shorter side to `resize` (PIL bilinear), centre crop, [0, 1], ImageNet-normalised, CHW: SwAV's eval recipe."""
    w, h = image.size
    scale = resize / min(w, h)
    resized = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = round((resized.width - crop) / 2), round((resized.height - crop) / 2)
    pixels = np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float64) / 255
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def test_builtin_scenes_under_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def small(root: Path) -> Path:  # the default 1,500 images cost seconds: same code, fewer images
        calls.append(root)
        return write_scenes(root, per_class_train=1, per_class_val=1, size=32)

    monkeypatch.setattr(scenes_module, "write_scenes", small)
    train, val = resolve_labelled(None, tmp_path / "cache")
    assert calls == [tmp_path / "cache" / f"scenes-v{FORMAT_VERSION}"]
    assert (train, val) == (calls[0] / "train", calls[0] / "val")
    assert sorted(p.name for p in train.iterdir()) == list(SCENE_CLASSES)

    train, val = resolve_labelled(None, tmp_path / "cache", "textures")  # the default 1,800 textures: ~1 s
    assert train == tmp_path / "cache" / f"textures-v{textures.FORMAT_VERSION}" / "train"
    assert sorted(p.name for p in val.iterdir()) == list(textures.TEXTURE_CLASSES)
    assert [len(list((train / c).iterdir())) for c in textures.TEXTURE_CLASSES] == [125] * 8
    with pytest.raises(ConfigError, match=r"eval.builtin='photos' is not a built-in labelled set: choose from "
                                          r"scenes, textures \(or set eval.data to a folder\)"):
        resolve_labelled(None, tmp_path / "cache", "photos")


def test_folder_paths_resolved_or_refused(tmp_path: Path) -> None:
    (tmp_path / "set" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no val/ sub-folder: expected <folder>/train/<class>/<image> and "):
        resolve_labelled(str(tmp_path / "set"), tmp_path)
    (tmp_path / "set" / "val").mkdir()
    assert resolve_labelled(str(tmp_path / "set"), tmp_path) == (tmp_path / "set" / "train", tmp_path / "set" / "val")
    with pytest.raises(ConfigError, match=r"missing does not exist: expected .*ImageFolder layout.*built-in scenes"):
        resolve_labelled(tmp_path / "missing", tmp_path)
    with pytest.raises(ConfigError, match="has no train/ or val/ sub-folder"):
        resolve_labelled(tmp_path / "set" / "train", tmp_path)


def test_default_sizes_keep_the_256_224_ratio() -> None:
    assert default_sizes(224) == (256, 224)
    assert default_sizes(64) == (73, 64)
    assert EvalTransforms.for_size(64) == EvalTransforms(73, 64, IMAGENET_MEAN, IMAGENET_STD)


def test_eval_transform_matches_pil_and_numpy() -> None:
    """A non-square photo-like image: torch's antialiased bilinear resize equals PIL's (measured: 1e-5/255)."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).resize((90, 60), Image.BICUBIC)
    out = eval_transform(73, 64)(smooth)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    std = np.array(IMAGENET_STD)[:, None, None]
    diff = np.abs(out.double().numpy() - _reference(smooth, 73, 64)) * std  # back to [0, 1] units
    assert diff.mean() < 0.1 / 255 and diff.max() < 1 / 255, (diff.mean() * 255, diff.max() * 255)
    assert torch.equal(EvalTransforms.for_size(64).eval()(smooth), out)


def test_train_transform_is_crop_flip_and_normalise() -> None:
    """With scale (1, 1) on a square image the crop is the whole image: the result is the normalised
    image or its mirror, both occur, and the draws follow torch's seed."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = torch.from_numpy(_reference(image, 32, 32)).float()
    transform = train_transform(32, scale=(1.0, 1.0))
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(16)]
    flipped = [torch.allclose(o, plain.flip(-1), atol=1e-5) for o in outs]
    assert all(f or torch.allclose(o, plain, atol=1e-5) for f, o in zip(flipped, outs))
    assert 0 < sum(flipped) < 16
    torch.manual_seed(0)
    assert all(torch.equal(a, transform(image)) for a in outs)
    crops = train_transform(24, scale=(0.08, 1.0))
    assert crops(image).shape == (3, 24, 24)
    assert not torch.equal(crops(image), crops(image))


def test_bad_sizes_say_so() -> None:
    with pytest.raises(ConfigError, match="crop must be between 1 and the resize size, got resize=64 crop=73"):
        eval_transform(64, 73)
    with pytest.raises(ConfigError, match=r"crop scale must satisfy 0 < low <= high <= 1, got \(0.5, 1.5\)"):
        train_transform(32, scale=(0.5, 1.5))


def test_imagefolder_classes_and_targets(scenes: Path) -> None:
    train = labelled_dataset(scenes / "train", eval_transform(73, 64))
    val = labelled_dataset(scenes / "val", eval_transform(73, 64))
    assert train.classes == val.classes == list(SCENE_CLASSES)
    assert len(train) == 30 and len(val) == 20
    assert train.targets == [SCENE_CLASSES.index(Path(p).parent.name) for p, _ in train.samples]
    assert train.targets == sorted(train.targets) and np.bincount(train.targets).tolist() == [3] * 10
    image, label = val[5]
    assert image.shape == (3, 64, 64) and label == val.targets[5] == 2
    check_same_classes(train, val)


def test_mismatched_or_empty_folders_refused(tmp_path: Path, scenes: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"in .*empty: Couldn't find any class folder; expected one sub-folder"):
        labelled_dataset(tmp_path / "empty")
    other = tmp_path / "other"
    for name in ("disc", "square", "zebra"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(other / name / "a.png")
    train = labelled_dataset(scenes / "train")
    with pytest.raises(ConfigError, match=r"only in train: arrow, crescent, cross, ellipse, heart \(\+3 more\); "
                                          r"only in val: zebra; give both splits the same class folders"):
        check_same_classes(train, labelled_dataset(other))
