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
