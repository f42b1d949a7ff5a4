"""Feature extraction split over real gloo ranks gives the one-process matrix; the cache answers repeats.

The reference is computed here in one process, batch by batch with
`extract_features` and a plain average pool (independent of the rank
blocks, padding and gathering under test). Two ranks run both a plain trunk
and the same trunk sharded with FSDP2 (`fully_shard` per block and at the
root), as `train.eval_every` meets it on a sharded run: every rank must run
the same number of forwards, which an odd image count (13 over 2 ranks)
exercises through the padding.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from harness.eval.features import cached_extract, extract, rank_block
from harness.models.features import extract_features
from harness.models.zoo import build_trunk
from tests.distributed import run_distributed

N, SIZE = 13, 32


def _images() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(N, 3, SIZE, SIZE, generator=g), torch.arange(N) % 3)


def _trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    trunk = build_trunk("regnety_200mf")
    for m in trunk.modules():  # non-trivial running statistics: eval mode must use them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return trunk.eval()


def _reference(trunk: torch.nn.Module, data: TensorDataset) -> dict[str, torch.Tensor]:
    images = data.tensors[0]
    with torch.no_grad():
        return extract_features(trunk, images, ("pool",))


def _extract_two_ways(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    data = _images()
    labels = data.tensors[1].tolist()
    plain = extract(_trunk(), data, labels, taps=("pool",), batch_size=4, rank=rank, world_size=world, show=False)
    sharded = _trunk()
    for stage in sharded.trunk_output.children():
        for block in stage.children():
            fully_shard(block)
    fully_shard(sharded)
    local = sum(p.to_local().numel() for p in sharded.parameters())
    full = sum(p.numel() for p in _trunk().parameters())
    feats = extract(sharded, data, labels, taps=("pool",), batch_size=4, rank=rank, world_size=world, show=False)
    return {"plain": plain.taps["pool"], "sharded": feats.taps["pool"], "labels": feats.labels,
            "local_fraction": local / full}


def test_rank_blocks_cover_every_image_once_with_equal_lengths():
    for n, world in [(13, 2), (5, 4), (8, 4), (1, 3)]:
        per_rank = -(-n // world)
        blocks = [rank_block(n, r, world) for r in range(world)]
        assert all(len(b) == per_rank for b in blocks)
        real = [i for r, b in enumerate(blocks) for i in b[:max(0, n - r * per_rank)]]
        assert real == list(range(n)) and all(i == n - 1 for r, b in enumerate(blocks)
                                              for i in b[max(0, n - r * per_rank):])


def test_two_gloo_ranks_give_the_one_rank_features_plain_and_fsdp2_sharded():
    data = _images()
    ref = _reference(_trunk(), data)
    single = extract(_trunk(), data, data.tensors[1].tolist(), taps=("pool",), batch_size=4, show=False)
    torch.testing.assert_close(single.taps["pool"], ref["pool"], rtol=1e-5, atol=1e-5)
    for rank, out in enumerate(run_distributed(_extract_two_ways, 2)):
        assert out["plain"].shape == (N, ref["pool"].shape[1])
        torch.testing.assert_close(out["plain"], ref["pool"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["sharded"], ref["pool"], rtol=1e-5, atol=1e-5)
        assert out["labels"].tolist() == data.tensors[1].tolist()
        assert out["local_fraction"] < 0.75  # the trunk really was sharded on rank {rank}


def _recompute_on_each_rank(rank: int, world: int) -> dict:
    from harness.eval.features import recompute_batchnorm

    trunk = _trunk()
    recompute_batchnorm(trunk, _images(), batch_size=4)
    return {k: v for k, v in trunk.state_dict().items() if "running" in k}


@pytest.mark.usefixtures("one_thread")  # the ranks' thread count: the same fp32 sums
def test_recomputed_batchnorm_is_the_same_on_two_gloo_ranks_as_in_one_process():
    """No collective: every rank passes the whole set, so every rank ends with the one-process statistics."""
    from harness.eval.features import recompute_batchnorm

    single = _trunk()
    recompute_batchnorm(single, _images(), batch_size=4)
    reference = {k: v for k, v in single.state_dict().items() if "running" in k}
    ranks = run_distributed(_recompute_on_each_rank, 2)
    for key, value in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks agree exactly
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def test_cache_answers_the_same_key_and_misses_a_changed_one(tmp_path):
    data, trunk = _images(), _trunk()
    labels = data.tensors[1].tolist()
    key = {"source": {"path": "x", "step": 1}, "taps": ["pool"]}
    first = cached_extract(tmp_path, key, trunk, data, labels, taps=("pool",), batch_size=8, show=False)
    assert not first.cached and len(list(tmp_path.glob("features-*.pt"))) == 1
    again = cached_extract(tmp_path, key, trunk, data, labels, taps=("pool",), batch_size=8, show=False)
    assert again.cached
    torch.testing.assert_close(again.taps["pool"], first.taps["pool"], rtol=0, atol=0)
    other = cached_extract(tmp_path, {**key, "source": {"path": "x", "step": 2}}, trunk, data, labels,
                           taps=("pool",), batch_size=8, show=False)
    assert not other.cached and len(list(tmp_path.glob("features-*.pt"))) == 2


def test_recomputed_batchnorm_statistics_are_the_data_s() -> None:
    """The stem's BatchNorm ends with the average of its input's per-batch mean and (unbiased) variance over
    the full batches (13 images in batches of 4: the lone 13th is left out), computed here by hand from the
    stem convolution; every BatchNorm's momentum and the trunk's mode come back, and the features change."""
    from harness.eval.features import recompute_batchnorm

    data = TensorDataset(torch.randn(13, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 + 1,
                         torch.zeros(13, dtype=torch.long))
    trunk = _trunk()
    before = _reference(trunk, data)["pool"]
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms[1].momentum = 0.3  # a non-default momentum must survive
    assert recompute_batchnorm(trunk, data, batch_size=4) == len(norms)
    assert not trunk.training and norms[0].momentum == 0.1 and norms[1].momentum == 0.3
    with torch.no_grad():
        stem = [trunk.stem[0](data.tensors[0][i:i + 4]) for i in range(0, 12, 4)]
    mean = torch.stack([x.mean((0, 2, 3)) for x in stem]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in stem]).mean(0)
    torch.testing.assert_close(norms[0].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms[0].running_var, var, rtol=1e-5, atol=1e-6)
    assert int(norms[0].num_batches_tracked) == 3
    assert not torch.allclose(_reference(trunk, data)["pool"], before)
