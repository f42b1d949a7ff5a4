"""Labelled images for evaluation: where they are, and the transforms the paper's protocols use.

Labelled data is an ImageFolder tree (`<folder>/train/<class>/*`,
`<folder>/val/<class>/*`), the layout ImageNet, Places205 and most
classification sets are shipped or converted to, read with
`torchvision.datasets.ImageFolder` (classes are the sorted folder names,
`dataset.targets` the labels). Without a folder, a built-in generated set
is used (`harness.eval.scenes`, the default, or `harness.eval.textures`), so
evaluation runs out of the box.

Transforms are torchvision.transforms.v2 and follow SwAV's eval scripts
(facebookresearch/swav eval_linear.py / eval_semisup.py), which VISSL and the
paper reuse: evaluation resizes the shorter side to 256 and centre-crops 224;
fine-tuning trains on RandomResizedCrop(224) + horizontal flip and nothing
else ("the same data augmentation as in SwAV" means eval_semisup.py's, which
has no colour jitter: the labels, not invariances, are what fine-tuning
adds). `default_sizes` scales 256/224 to other image sizes: 73/64 for the
64 px scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from harness.config.loader import ConfigError
from harness.eval import scenes, textures

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LAYOUT = "<folder>/train/<class>/<image> and <folder>/val/<class>/<image> (ImageFolder layout)"


BUILTIN_SETS = {"scenes": scenes, "textures": textures}  # the built-in labelled sets, by `eval.builtin`


def check_builtin(name: str) -> None:
    if name not in BUILTIN_SETS:
        raise ConfigError(f"eval.builtin={name!r} is not a built-in labelled set: choose from "
                          f"{', '.join(BUILTIN_SETS)} (or set eval.data to a folder)")


def builtin_dir(cache_dir: str | Path, name: str = "scenes") -> Path:
    """Where a built-in set lives under a cache folder (versioned: a new format never meets an old tree)."""
    check_builtin(name)
    return Path(cache_dir) / f"{name}-v{BUILTIN_SETS[name].FORMAT_VERSION}"


def resolve_labelled(path: str | Path | None, cache_dir: str | Path, builtin: str = "scenes") -> tuple[Path, Path]:
    """(train_dir, val_dir) of a labelled set: `path`'s train/ and val/, or the built-in set `builtin` when
    `path` is None.

    Checked here, before any model is built, so a wrong path fails in one line.
    """
    if path is None:
        root = builtin_dir(cache_dir, builtin)  # checks the name
        root = getattr(BUILTIN_SETS[builtin], f"write_{builtin}")(root)  # the set's default size and counts
        return root / "train", root / "val"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"labelled data folder {root} does not exist: expected {LAYOUT}, "
                          "or leave the path unset for the built-in scenes")
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise ConfigError(f"labelled data folder {root} has no {' or '.join(f'{m}/' for m in missing)} "
                          f"sub-folder: expected {LAYOUT}")
    return root / "train", root / "val"


def default_sizes(image_size: int) -> tuple[int, int]:
    """(resize, crop) at `image_size`: the standard protocol's 256/224 ratio (224 -> 256, 64 -> 73)."""
    if image_size < 1:
        raise ConfigError(f"image size must be >= 1, got {image_size}")
    return round(image_size * 256 / 224), image_size


def eval_transform(resize: int, crop: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Shorter side to `resize`, centre `crop`, float in [0, 1], normalised: deterministic, for features and val."""
    if not 1 <= crop <= resize:
        raise ConfigError(f"eval crop must be between 1 and the resize size, got resize={resize} crop={crop}")
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def train_transform(crop: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """SwAV eval_semisup.py's fine-tuning augmentation: RandomResizedCrop(`crop`, `scale`) + horizontal flip.

    The random draws come from torch's global generator, which the DataLoader
    seeds per worker from its own seed, as in every torchvision pipeline.
    """
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(crop, scale=(lo, hi), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


@dataclass(frozen=True)
class EvalTransforms:
    """The sizes and normalisation of one evaluation, and the two transforms built from them."""

    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def for_size(cls, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> EvalTransforms:
        resize, crop = default_sizes(image_size)
        return cls(resize, crop, tuple(mean), tuple(std))

    def eval(self) -> v2.Compose:
        return eval_transform(self.resize, self.crop, self.mean, self.std)

    def train(self, scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
        return train_transform(self.crop, self.mean, self.std, scale)


def labelled_dataset(folder: str | Path, transform=None) -> datasets.ImageFolder:
    """An ImageFolder over `folder` (one sub-folder per class); an empty or classless folder fails in one line."""
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:  # no class folders, or a class folder with no image files
        reason = str(err).replace(f" in {folder}", "").rstrip(".")
        raise ConfigError(f"cannot read labelled images in {folder}: {reason}; expected one sub-folder per class "
                          f"holding images, as in {LAYOUT}") from None


def check_same_classes(train: datasets.ImageFolder, val: datasets.ImageFolder) -> None:
    """Labels are folder indices, so train and val must list the same classes or every label would be off."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))

    def show(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") if names else "none"

    raise ConfigError(f"train and val classes differ: only in train: {show(only_train)}; "
                      f"only in val: {show(only_val)}; give both splits the same class folders")
