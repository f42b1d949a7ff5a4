"""Projection head layout and prototype numerics."""

from __future__ import annotations

import torch
from torch import nn

from harness.ssl.swav import ProjectionHead, Prototypes


def test_head_layout_bn_free() -> None:
    head = ProjectionHead([16, 32, 32, 8])
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]  # nothing after the last layer
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(16, 32), (32, 32), (32, 8)]
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 8) and (out < 0).any()


def test_head_with_batchnorm_and_identity() -> None:
    head = ProjectionHead([16, 32, 8], batchnorm=True)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    x = torch.randn(3, 16)
    assert torch.equal(ProjectionHead([16])(x), x)


def test_prototypes_unit_rows_and_normalize() -> None:
    protos = Prototypes(8, [5, 3])
    assert [tuple(h.weight.shape) for h in protos.heads] == [(5, 8), (3, 8)]
    assert all(h.bias is None for h in protos.heads)
    for h in protos.heads:  # normalised at construction
        torch.testing.assert_close(h.weight.norm(dim=1), torch.ones(h.weight.shape[0]))
    with torch.no_grad():
        for h in protos.heads:
            h.weight.mul_(torch.rand(h.weight.shape[0], 1) * 10 + 0.1)
    protos.normalize_()
    for h in protos.heads:
        torch.testing.assert_close(h.weight.norm(dim=1), torch.ones(h.weight.shape[0]))
        assert h.weight.grad is None


def test_prototypes_scores_fp32_under_autocast() -> None:
    protos = Prototypes(8, [5])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(z, z.T).dtype == torch.bfloat16  # autocast is really on
        scores = protos(z.to(torch.bfloat16))
    assert [s.dtype for s in scores] == [torch.float32]
    assert protos.heads[0].weight.dtype == torch.float32 and Prototypes.KEEP_FP32
    scores = protos(z)
    torch.testing.assert_close(scores[0], z @ protos.heads[0].weight.T)
    scores[0].sum().backward()
    assert z.grad is not None and protos.heads[0].weight.grad is not None
