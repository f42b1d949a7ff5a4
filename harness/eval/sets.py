"""The labelled train/val sets an evaluation reads, as its config describes them.

One place turns `eval:` (folder or built-in scenes, sizes, low-shot subset)
into datasets, so `harness eval` and `train.eval_every` see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from harness.config.schema import AugmentConfig, EvalConfig


@dataclass
class LabelledSets:
    """Train (possibly a low-shot subset) and val, with the eval-transform datasets and their labels."""

    train: Dataset
    val: Dataset
    train_labels: list[int]
    val_labels: list[int]
    classes: list[str]
    describe: dict[str, Any]  # folders, counts, sizes, subset: written into results
    train_dir: Path
    val_dir: Path
    train_indices: Optional[list[int]] = None  # the low-shot subset of train_dir's images; None: all


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_folders(cfg: EvalConfig, cache_dir: Path, is_main: bool) -> tuple[Path, Path]:
    """(train, val) folders; a built-in set is written by the main rank while the others wait."""
    from harness.eval.data import resolve_labelled

    if is_main:
        folders = resolve_labelled(cfg.data, cache_dir, cfg.builtin)
    _barrier()
    if not is_main:
        folders = resolve_labelled(cfg.data, cache_dir, cfg.builtin)  # the tree exists now: only checked
    return folders


def subset_indices(labels: list[int], subset: Optional[str], seed: int) -> Optional[list[int]]:
    """The balanced, seeded low-shot subset `subset` names ("1%", "10%", "5/class"); None: all."""
    if not subset:
        return None
    from harness.eval.lowshot import lowshot_indices, parse_subset

    fraction, per_class = parse_subset(subset)
    return lowshot_indices(labels, fraction=fraction, per_class=per_class, seed=seed)


def build_sets(cfg: EvalConfig, normalize: AugmentConfig, cache_dir: Path, is_main: bool,
               train_transform: Any = None) -> LabelledSets:
    """Datasets with the centre-crop eval transform (or `train_transform` for the train set)."""
    from harness.eval.data import check_same_classes, eval_transform, labelled_dataset

    train_dir, val_dir = resolve_folders(cfg, cache_dir, is_main)
    plain = eval_transform(cfg.resize, cfg.crop, normalize.normalize_mean, normalize.normalize_std)
    train = labelled_dataset(train_dir, train_transform or plain)
    val = labelled_dataset(val_dir, plain)
    check_same_classes(train, val)
    train_labels = list(train.targets)
    indices = subset_indices(train_labels, cfg.subset, cfg.seed)
    if indices is not None:
        train, train_labels = Subset(train, indices), [train_labels[i] for i in indices]
    describe = {"train": str(train_dir), "val": str(val_dir), "classes": len(val.classes),
                "train_images": len(train_labels), "val_images": len(val.targets), "crop": cfg.crop,
                "resize": cfg.resize, "subset": cfg.subset, "subset_seed": cfg.seed if cfg.subset else None,
                "builtin": cfg.builtin if cfg.data is None else None}  # the generated set used, if any
    return LabelledSets(train, val, train_labels, list(val.targets), list(val.classes), describe,
                        train_dir, val_dir, indices)
