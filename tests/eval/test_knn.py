"""k-NN on frozen features against scikit-learn's KNeighborsClassifier with DINO's weighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from harness.config.loader import ConfigError
from harness.eval.knn import knn_classify, topk_accuracy

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def clusters() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """3 overlapping Gaussian clusters in 16-d: 150 train / 60 test, seed 0.

    The spread makes many test points' neighbourhoods mixed, so the weights
    (not just a majority) decide, and some points are misclassified.
    """
    rng = np.random.RandomState(0)
    centres = rng.normal(size=(NUM_CLASSES, 16))

    def draw(n_per: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(NUM_CLASSES), n_per)
        return (centres[y] + 2.0 * rng.normal(size=(len(y), 16))).astype(np.float32), y

    x_tr, y_tr = draw(50)
    x_te, y_te = draw(20)
    return x_tr, y_tr, x_te, y_te


def _sklearn(clusters, k: int, temperature: float) -> KNeighborsClassifier:
    x_tr, y_tr, _, _ = clusters
    # cosine distance d = 1 - cos, so exp((1 - d) / T) is DINO's exp(sim / T).
    return KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute",
        weights=lambda d: np.exp((1.0 - d) / temperature),
    ).fit(x_tr.astype(np.float64), y_tr)


def _ours(clusters, **kw) -> torch.Tensor:
    x_tr, y_tr, x_te, _ = clusters
    return knn_classify(
        torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), num_classes=NUM_CLASSES, **kw
    )


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (20, 0.005)])
def test_matches_sklearn_weighted_knn(clusters, k: int, temperature: float) -> None:
    """Predictions identical; normalised scores equal predict_proba within 1e-5.

    T=0.005 would overflow float32 as exp(sim / T); the shifted votes keep it finite.
    """
    ref = _sklearn(clusters, k, temperature)
    x_te, y_te = clusters[2], clusters[3]
    ref_proba = ref.predict_proba(x_te.astype(np.float64))
    scores = _ours(clusters, k=k, temperature=temperature)
    assert torch.isfinite(scores).all()
    proba = (scores / scores.sum(1, keepdim=True)).double().numpy()
    # The fixture has no exact class-score ties, so argmax is well defined on both sides.
    top2 = np.sort(ref_proba, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4
    np.testing.assert_array_equal(proba.argmax(1), ref.predict(x_te.astype(np.float64)))
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-5)
    # Not trivial: some points are wrong, some neighbourhoods mixed.
    acc = (proba.argmax(1) == y_te).mean()
    assert 0.5 < acc < 1.0
    assert ((proba > 1e-3).sum(1) > 1).sum() >= 3


def test_k_clamped_to_train_set_and_chunking_invariant(clusters) -> None:
    full = _ours(clusters, k=150)
    torch.testing.assert_close(_ours(clusters, k=1000), full, rtol=0, atol=0)
    torch.testing.assert_close(_ours(clusters, k=150, chunk=7), full, rtol=1e-5, atol=0)
    ref = _sklearn(clusters, 150, 0.07).predict_proba(clusters[2].astype(np.float64))
    np.testing.assert_allclose((full / full.sum(1, keepdim=True)).numpy(), ref, rtol=0, atol=1e-5)


def test_topk_accuracy_counts_and_breaks_ties_by_class_index() -> None:
    scores = torch.tensor(
        [[0.1, 0.7, 0.2, 0.0, 0.0, 0.0],   # label 1: top-1
         [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],   # label 2: second -> top-5 only
         [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],   # label 0: ties with 1..4 -> rank 1 of the tie -> top-5
         [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # label 4: last of the tied zeros -> rank 6 -> missed
    labels = torch.tensor([1, 2, 0, 4])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {"top1": 25.0, "top2": 75.0, "top5": 75.0}
    # k above the number of classes is clamped: every label is within the 3 classes.
    assert topk_accuracy(scores[:, :3], torch.tensor([1, 2, 0, 2]), ks=(1, 5))["top5"] == 100.0


def test_bad_settings_raise_one_line(clusters) -> None:
    with pytest.raises(ConfigError, match="k >= 1 neighbours, got k=0"):
        _ours(clusters, k=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        _ours(clusters, temperature=0.0)
    x_tr, y_tr, _, _ = clusters
    with pytest.raises(ValueError, match="differ in width"):
        knn_classify(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.zeros(2, 8), num_classes=3)
