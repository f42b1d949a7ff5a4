"""Weighted k-NN classification on frozen features, as DINO evaluates.

DINO (Caron et al. 2021, facebookresearch/dino `eval_knn.py`, `knn_classifier`)
L2-normalises train and test features, takes the k train features with the
highest cosine similarity to each test feature (one matmul per chunk of test
rows, then `topk`), and lets each neighbour vote for its label with weight
exp(sim / T); a test point's class scores are the summed votes. k=20, T=0.07
are DINO's defaults ("20 is usually working the best").

Two deliberate differences, neither of which changes a prediction:
- votes are exp((sim - sim_max) / T), sim_max the test point's best
  similarity: DINO's votes divided by one positive constant per test row, so
  rankings and normalised scores are DINO's exactly, while exp(1 / T) would
  overflow float32 for T below about 0.0113;
- votes are accumulated with `scatter_add_` instead of DINO's one-hot
  [chunk * k, num_classes] buffer and product: the same sums, k times less
  memory.

Ties. Neighbours: `torch.topk` keeps an unspecified one of several train
points at exactly the same similarity at the k-th place (scikit-learn too;
continuous features make that a measure-zero event). Classes: the lower class
index wins (`topk_accuracy` sorts stably, so equal scores keep index order,
which is also what `argmax` and scikit-learn's `predict` return).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.config.loader import ConfigError


def _check_settings(k: int, temperature: float, chunk: int, num_classes: int) -> None:
    if k < 1:
        raise ConfigError(f"k-NN needs k >= 1 neighbours, got k={k}; DINO uses k=20")
    if not temperature > 0:
        raise ConfigError(f"k-NN temperature must be > 0, got {temperature}; DINO uses 0.07")
    if chunk < 1:
        raise ConfigError(f"k-NN chunk must be >= 1 test rows, got {chunk}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [n_test, num_classes] (float32, on the features' device).

    Features are L2-normalised here (in float32, whatever their dtype); `k` is
    clamped to the number of train points. `chunk` bounds memory to a
    [chunk, n_train] similarity block. Divide by the row sum for class
    probabilities (scikit-learn's `predict_proba` with the same weighting).
    """
    _check_settings(k, temperature, chunk, num_classes)
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be [n, dim]; got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in width ({train_features.shape[1]} vs "
            f"{test_features.shape[1]}): extract both from the same tap"
        )
    n_train = train_features.shape[0]
    if n_train == 0 or train_labels.shape != (n_train,):
        raise ValueError(
            f"need one label per train feature and at least one: {n_train} features, "
            f"labels of shape {tuple(train_labels.shape)}"
        )
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.to(device).float(), dim=1)
    labels = train_labels.to(device).long()
    k = min(k, n_train)
    scores = torch.zeros(test.shape[0], num_classes, device=device)
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = ((sim - sim[:, :1]) / temperature).exp_()
        scores[start : start + chunk].scatter_add_(1, labels[idx], votes)
    return scores


@torch.no_grad()
def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %, ...}: percent of rows whose label is among the k best scores.

    k above the number of classes is clamped (top-5 of 4 classes is 100%).
    Equal scores rank by class index (stable sort), as in the module docstring.
    """
    if scores.ndim != 2 or labels.shape != scores.shape[:1] or scores.shape[0] == 0:
        raise ValueError(
            f"need scores [n, classes] and n labels with n > 0; got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if any(k < 1 for k in ks):
        raise ConfigError(f"top-k accuracies need k >= 1, got {list(ks)}")
    depth = min(max(ks), scores.shape[1])
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :depth]
    hit = order == labels.to(scores.device).view(-1, 1)
    # Cumulative hits: column j says "label within the best j + 1"; one host sync for all ks.
    within = hit.cumsum(dim=1).float().mean(dim=0).mul_(100.0).tolist()
    return {f"top{k}": within[min(k, depth) - 1] for k in ks}
