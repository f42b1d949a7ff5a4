"""The three evaluations of a trunk (k-NN, linear probe, fine-tuning) over every rank.

Feature extraction and fine-tuning are split over the ranks; the classifiers
on cached features (k-NN, linear heads) are cheap and run on rank 0, which
returns the results (other ranks return None). The same functions serve
`harness eval` and `train.eval_every` (`knn_metrics` on the live trunk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.config.schema import RunConfig
from harness.eval.features import Features, cached_extract, files_fingerprint
from harness.eval.sets import LabelledSets


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def set_features(trunk: nn.Module, sets: LabelledSets, cfg: RunConfig, device: torch.device, *,
                 taps: tuple[str, ...] = ("pool",), cache_dir: Optional[Path] = None,
                 source: Optional[dict[str, Any]] = None, show: bool = True) -> tuple[Features, Features]:
    """(train, val) features of `sets`; cached under `cache_dir` keyed by the trunk's `source`."""
    rank, world = _world()
    e = cfg.eval
    common = dict(taps=taps, batch_size=e.batch_size, num_workers=e.num_workers, device=device, rank=rank,
                  world_size=world, show=show)
    key = {"source": source, "taps": list(taps), "crop": e.crop, "resize": e.resize,
           "mean": cfg.data.augment.normalize_mean, "std": cfg.data.augment.normalize_std}
    use_cache = cache_dir if source is not None else None
    train = cached_extract(use_cache, {**key, "set": _fingerprint(sets.train_dir, sets.train_indices)}, trunk,
                           sets.train, sets.train_labels, desc="train features", **common)
    val = cached_extract(use_cache, {**key, "set": _fingerprint(sets.val_dir, None)}, trunk, sets.val,
                         sets.val_labels, desc="val features", **common)
    return train, val


def _fingerprint(folder: Path, indices: Optional[list[int]]) -> str:
    from torchvision.datasets.folder import make_dataset, find_classes

    _, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=(".png", ".jpg", ".jpeg", ".webp", ".bmp",
                                                                   ".tif", ".tiff", ".gif", ".ppm", ".pgm"))
    if indices is not None:
        samples = [samples[i] for i in indices]
    return files_fingerprint(samples)


def knn_metrics_from(train: Features, val: Features, num_classes: int, cfg: RunConfig) -> dict[str, float]:
    """top1/top5 (percent) of the weighted k-NN of val's pooled features among train's."""
    from harness.eval.knn import knn_classify, topk_accuracy

    scores = knn_classify(train.taps["pool"], train.labels, val.taps["pool"], num_classes=num_classes,
                          k=cfg.eval.knn.k, temperature=cfg.eval.knn.temperature)
    return topk_accuracy(scores, val.labels)


def knn_metrics(trunk: nn.Module, sets: LabelledSets, cfg: RunConfig, device: torch.device) -> Optional[dict]:
    """`knn_top1`/`knn_top5` of a live (possibly sharded) trunk, on rank 0; every rank must call it."""
    train, val = set_features(trunk, sets, cfg, device, show=False)
    if _world()[0] != 0:
        return None
    return {f"knn_{k}": v for k, v in knn_metrics_from(train, val, len(sets.classes), cfg).items()}


def linear_results(train: Features, val: Features, num_classes: int, cfg: RunConfig,
                   device: torch.device) -> dict[str, Any]:
    """One set of heads per tap (a head per weight decay), trained on the cached features."""
    from harness.eval.linear import LinearConfig, train_linear

    lin = cfg.eval.linear
    head_cfg = LinearConfig(epochs=lin.epochs, milestones=list(lin.milestones), base_lr=lin.base_lr,
                            momentum=lin.momentum, nesterov=lin.nesterov, weight_decays=list(lin.weight_decays),
                            batch_size=lin.batch_size, batchnorm=lin.batchnorm, seed=cfg.eval.seed)
    out: dict[str, Any] = {}
    for tap in lin.taps:
        channels = train.channels.get(tap) if tap != "pool" else None  # VISSL: BatchNorm2d over the grid
        result = train_linear(train.taps[tap], train.labels, val.taps[tap], val.labels, num_classes, head_cfg,
                              channels=channels, device=device)
        out[tap] = {"top1": result.best_top1, "top5": result.best_top5, "best_weight_decay": result.best_wd,
                    "features": int(train.taps[tap].shape[1]),
                    "lr": result.lr, "per_weight_decay": {str(wd): r for wd, r in result.per_wd.items()}}
    return out
