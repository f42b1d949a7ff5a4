"""SwAVLoss against the formulas written out in float64, and the queue's behaviour."""

from __future__ import annotations

import pytest
import torch

from harness.config.schema import SwAVConfig
from harness.ssl.swav import Prototypes, SwAVLoss

EPS, T = 0.05, 0.1


def ref_codes(out: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn written as the formulas: Q = exp(C/eps)^T, alternate marginals."""
    Q = torch.exp(out.double() / EPS).T  # [K, B]
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).T


def ref_loss(scores, B, n_crops, assign, iterations, queue_scores=None) -> float:
    """Mean over heads and assigned crops of -sum_k q log softmax(s_v / T), averaged over v != crop."""
    per_head = []
    for h, s in enumerate(scores):
        s = s.detach().double()
        block = lambda c: s[B * c : B * (c + 1)]  # noqa: E731
        head = 0.0
        for i, c in enumerate(assign):
            out = block(c)
            if queue_scores is not None:
                out = torch.cat([queue_scores[i][h].double(), out])
            q = ref_codes(out, iterations)[-B:]
            terms = []
            for v in range(n_crops):
                if v == c:
                    continue
                logits = block(v) / T
                log_p = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
                terms.append(-(q * log_p).sum(dim=1).mean())
            head += sum(terms) / (n_crops - 1)
        per_head.append(head / len(assign))
    return float(sum(per_head) / len(per_head))


def make_batch(n_crops: int, B: int, D: int, counts: list[int], seed: int = 0):
    torch.manual_seed(seed)
    protos = Prototypes(D, counts)
    emb = torch.nn.functional.normalize(torch.randn(n_crops * B, D), dim=1)
    return protos, emb, protos(emb)


def test_hand_computed_two_crops() -> None:
    # 2 crops, B=2, K=3, D=4, one Sinkhorn iteration, with fixed numbers.
    cfg = SwAVConfig(head_dims=[4, 4], num_prototypes=[3], sinkhorn_iterations=1, epsilon=EPS, temperature=T)
    protos = Prototypes(4, [3])
    with torch.no_grad():
        protos.heads[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.6, 0.8]]))
    emb = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.2, 0, 0], [0, 1, 0.3, 0], [0.5, 0.5, 0.5, 0.5], [0.1, 0, 1, 0]]), dim=1
    )
    scores = protos(emb)
    loss = SwAVLoss(cfg, 4, 2)(emb, scores, 2, 0, protos)
    expected = ref_loss([emb.double() @ protos.heads[0].weight.detach().double().T], 2, 2, [0, 1], 1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n_crops, assign, counts", [(3, [0, 1], [5]), (4, [1], [6, 4]), (2, [0, 1], [3, 7])])
def test_general_crops_and_heads(n_crops: int, assign: list[int], counts: list[int]) -> None:
    B, D = 4, 8
    protos, emb, scores = make_batch(n_crops, B, D, counts)
    cfg = SwAVConfig(head_dims=[D, D], num_prototypes=counts, sinkhorn_iterations=3, crops_for_assign=assign)
    loss = SwAVLoss(cfg, D, n_crops)(emb, scores, B, 0, protos)
    assert loss.item() == pytest.approx(ref_loss(scores, B, n_crops, assign, 3), rel=1e-5)


def test_gradient_flows_to_predictions_only() -> None:
    B, D, n_crops = 3, 6, 2
    protos, emb, _ = make_batch(n_crops, B, D, [4])
    scores = [protos(emb)[0].detach().requires_grad_()]
    cfg = SwAVConfig(head_dims=[D, D], num_prototypes=[4])
    SwAVLoss(cfg, D, n_crops)(emb, scores, B, 0, protos).backward()
    # d/ds_v of -mean_b sum_k q log softmax(s_v/T) = (softmax(s_v/T) - q) / (T*B), q held fixed.
    s = scores[0].detach().double()
    expected = []
    for v, c in ((0, 1), (1, 0)):
        q = ref_codes(s[B * c : B * (c + 1)], 3)
        p = torch.softmax(s[B * v : B * (v + 1)] / T, dim=1)
        expected.append((p - q) / (T * B) / 2)  # averaged over the 2 assigned crops
    torch.testing.assert_close(scores[0].grad.double(), torch.cat(expected), rtol=1e-4, atol=1e-7)


def queue_setup(queue_length: int = 4, start: int = 5):
    B, D, n_crops = 2, 8, 3
    cfg = SwAVConfig(
        head_dims=[D, D], num_prototypes=[5], crops_for_assign=[0, 1], queue_length=queue_length, queue_start_iter=start
    )
    return cfg, B, D, n_crops


def test_queue_is_filled_newest_first_and_persistent() -> None:
    cfg, B, D, n_crops = queue_setup()
    crit = SwAVLoss(cfg, D, n_crops)
    assert "queue" in crit.state_dict() and crit.queue.shape == (2, 4, D)
    protos, emb1, s1 = make_batch(n_crops, B, D, [5], seed=1)
    _, emb2, s2 = make_batch(n_crops, B, D, [5], seed=2)
    crit(emb1, s1, B, 0, protos)
    assert torch.equal(crit.queue[0, :B], emb1[:B]) and torch.equal(crit.queue[1, :B], emb1[B : 2 * B])
    assert torch.count_nonzero(crit.queue[:, B:]) == 0 and not crit.queue_active(10)
    crit(emb2, s2, B, 1, protos)
    assert torch.equal(crit.queue[0], torch.cat([emb2[:B], emb1[:B]]))
    assert torch.equal(crit.queue[1], torch.cat([emb2[B : 2 * B], emb1[B : 2 * B]]))
    assert not crit.queue.requires_grad
    assert crit.queue_active(10) and not crit.queue_active(4)
    # A fresh loss resumes with the same queue from a checkpoint.
    clone = SwAVLoss(cfg, D, n_crops)
    clone.load_state_dict(crit.state_dict())
    assert torch.equal(clone.queue, crit.queue) and clone.queue_active(10)


def test_queue_used_when_active_and_ignored_before_start() -> None:
    cfg, B, D, n_crops = queue_setup(start=5)
    plain = SwAVLoss(SwAVConfig(head_dims=[D, D], num_prototypes=[5]), D, n_crops)
    crit = SwAVLoss(cfg, D, n_crops)
    protos, emb, scores = make_batch(n_crops, B, D, [5], seed=3)
    for seed in (4, 5):  # fill the queue with other batches
        _, e, s = make_batch(n_crops, B, D, [5], seed=seed)
        crit(e, s, B, 0, protos)
    queue = crit.queue.clone()
    no_queue = plain(emb, scores, B, 0, protos).item()

    before_start = crit(emb, scores, B, 4, protos).item()
    assert before_start == pytest.approx(no_queue, rel=1e-6)

    crit.queue.copy_(queue)
    active = crit(emb, scores, B, 5, protos).item()
    queue_scores = [[(queue[i].double() @ protos.heads[0].weight.detach().double().T)] for i in range(2)]
    assert active == pytest.approx(ref_loss(scores, B, n_crops, [0, 1], 3, queue_scores), rel=1e-5)
    assert abs(active - no_queue) > 1e-4


def test_queue_scores_use_current_prototypes() -> None:
    cfg, B, D, n_crops = queue_setup(start=0)
    crit = SwAVLoss(cfg, D, n_crops)
    protos, emb, scores = make_batch(n_crops, B, D, [5], seed=6)
    for seed in (7, 8):
        _, e, s = make_batch(n_crops, B, D, [5], seed=seed)
        crit(e, s, B, 0, protos)
    queue = crit.queue.clone()
    first = crit(emb, scores, B, 0, protos).item()
    with torch.no_grad():  # move the prototypes: only the queue's scores depend on them now
        protos.heads[0].weight.copy_(torch.roll(protos.heads[0].weight, 1, dims=0))
    crit.queue.copy_(queue)
    assert crit(emb, scores, B, 0, protos).item() != pytest.approx(first, rel=1e-6)


def test_validation() -> None:
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAVLoss(SwAVConfig(crops_for_assign=[0, 2]), 8, 2)
    with pytest.raises(ValueError, match="at least 2 crops"):
        SwAVLoss(SwAVConfig(crops_for_assign=[0]), 8, 1)
    cfg = SwAVConfig(head_dims=[8, 8], num_prototypes=[5])
    protos, emb, scores = make_batch(2, 3, 8, [5])
    with pytest.raises(ValueError, match="rows"):
        SwAVLoss(cfg, 8, 2)(emb, scores, 4, 0, protos)
    assert SwAVLoss(cfg, 8, 2).state_dict() == {}  # no queue, nothing to checkpoint


def per_crop_sinkhorn(out: torch.Tensor, iterations: int, use_fp64: bool) -> torch.Tensor:
    """The per-crop Sinkhorn in the working precision, one crop at a time, step by step as SwAV writes it."""
    dtype = torch.float64 if use_fp64 else torch.float32
    logits = out.to(dtype) / EPS
    q = torch.exp(logits - logits.max())
    q = q / q.sum()
    B, K = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / K
        q = q / q.sum(dim=1, keepdim=True) / B
    return (q * B).float()


def per_crop_loss(scores, B, n_crops, assign, iterations, use_fp64=False, queue_scores=None):
    """fp32 loss with Python loops over heads, assigned crops and other crops; also returns the codes."""
    total, codes = 0.0, []
    for h, s in enumerate(scores):
        head = 0.0
        for i, c in enumerate(assign):
            out = s.detach()[B * c : B * (c + 1)]
            if queue_scores is not None:
                out = torch.cat([queue_scores[i][h], out])
            q = per_crop_sinkhorn(out, iterations, use_fp64)[-B:]
            codes.append(q)
            sub = 0.0
            for v in range(n_crops):
                if v != c:
                    sub = sub - (q * torch.log_softmax(s[B * v : B * (v + 1)] / T, dim=1)).sum(dim=1).mean()
            head = head + sub / (n_crops - 1)
        total = total + head / len(assign)
    return total / len(scores), codes


@pytest.mark.parametrize(
    "n_crops, assign, counts, use_fp64",
    [(6, [0, 1], [16, 9], False), (6, [0, 1], [16], True), (5, [0, 2, 4], [7], False), (4, [3, 0], [6, 5], False)],
)
def test_vectorised_equals_per_crop_computation(n_crops, assign, counts, use_fp64) -> None:
    """Same value, gradient and codes as crop by crop, to fp32 rounding; queue active, strided and
    unordered crop ids, several heads, both Sinkhorn precisions."""
    B, D, L = 4, 8, 6
    cfg = SwAVConfig(head_dims=[D, D], num_prototypes=counts, crops_for_assign=assign, sinkhorn_fp64=use_fp64,
                     queue_length=L)
    crit = SwAVLoss(cfg, D, n_crops)
    protos, emb, _ = make_batch(n_crops, B, D, counts, seed=11)
    for seed in (12, 13):  # fill the queue (6 rows, 2 x 4 pushed) with other batches
        _, e, s = make_batch(n_crops, B, D, counts, seed=seed)
        crit(e, s, B, 0, protos)
    queue = crit.queue.clone()
    assert crit.queue_active(0)
    with torch.no_grad():
        queue_scores = [protos(queue[i]) for i in range(len(assign))]

    for use_queue in (False, True):
        crit.queue.copy_(queue)
        crit.queue_start_iter = 0 if use_queue else 1
        leaf = [s.detach().requires_grad_() for s in protos(emb)]
        mine = crit(emb, leaf, B, 0, protos)
        mine.backward()
        ref_leaf = [s.detach().requires_grad_() for s in leaf]
        ref, codes = per_crop_loss(ref_leaf, B, n_crops, assign, 3, use_fp64, queue_scores if use_queue else None)
        ref.backward()
        assert mine.item() == pytest.approx(ref.item(), rel=2e-6, abs=1e-7)
        for g, r in zip(leaf, ref_leaf):
            torch.testing.assert_close(g.grad, r.grad, rtol=1e-5, atol=1e-8)
        mine_codes = [q for per_head in crit.last_assignments for q in per_head.unbind(0)]
        assert len(mine_codes) == len(codes) == len(counts) * len(assign)
        for q, r in zip(mine_codes, codes):
            torch.testing.assert_close(q, r, rtol=1e-5, atol=1e-7)
    # And the independent float64 formulas agree too (queue active, the last pass).
    qs = [[x.double() for x in per_crop] for per_crop in queue_scores]
    assert mine.item() == pytest.approx(ref_loss(leaf, B, n_crops, assign, 3, qs), rel=1e-5)


@pytest.mark.parametrize("B", [2, 4, 6])
def test_enqueue_shorter_equal_and_longer_batches(B: int) -> None:
    """Newest first, the oldest rows fall off; a batch longer than the queue keeps its first rows."""
    D, n_crops, L = 8, 3, 4
    cfg = SwAVConfig(head_dims=[D, D], num_prototypes=[5], crops_for_assign=[2, 0], queue_length=L)
    crit = SwAVLoss(cfg, D, n_crops)
    protos, emb1, s1 = make_batch(n_crops, B, D, [5], seed=1)
    _, emb2, s2 = make_batch(n_crops, B, D, [5], seed=2)
    crit(emb1, s1, B, 0, protos)
    crit(emb2, s2, B, 1, protos)
    for i, c in enumerate([2, 0]):
        crop = lambda e: e[B * c : B * (c + 1)]  # noqa: E731
        assert torch.equal(crit.queue[i], torch.cat([crop(emb2), crop(emb1)])[:L])
    assert crit.queue_fill == int(crit.queue_count) == L


def test_host_fill_level_follows_the_buffer() -> None:
    """The host copy decides activity without a device read, and is re-read when the buffers
    change behind the module's back (load_state_dict by itself; a raw copy via sync_host_state)."""
    cfg, B, D, n_crops = queue_setup(queue_length=4, start=0)
    crit = SwAVLoss(cfg, D, n_crops)
    protos, emb, scores = make_batch(n_crops, B, D, [5])
    crit(emb, scores, B, 0, protos)
    assert crit.queue_fill == int(crit.queue_count) == 2 and not crit.queue_active(0)
    snapshot = {k: v.clone() for k, v in crit.state_dict().items()}
    crit(emb, scores, B, 1, protos)
    assert crit.queue_fill == int(crit.queue_count) == 4 and crit.queue_active(1)

    crit.queue_count.copy_(snapshot["queue_count"])  # what a skipped step's buffer restore does
    assert crit.queue_active(1)  # stale until told
    crit.sync_host_state()
    assert crit.queue_fill == 2 and not crit.queue_active(1)

    fresh = SwAVLoss(cfg, D, n_crops)
    fresh.load_state_dict(crit.state_dict() | {"queue_count": torch.tensor(4)})
    assert fresh.queue_fill == 4 and fresh.queue_active(0)
    holder = torch.nn.ModuleDict({"criterion": SwAVLoss(cfg, D, n_crops)})  # as a submodule, too
    holder.load_state_dict({f"criterion.{k}": v for k, v in fresh.state_dict().items()})
    assert holder["criterion"].queue_fill == 4
