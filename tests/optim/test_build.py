"""Parameter groups and optimizer choice from OptimConfig."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config.schema import LarsConfig, OptimConfig
from harness.optim.build import build_optimizer
from harness.optim.lars import LARS


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def _ids(group) -> list[int]:
    return [id(p) for p in group["params"]]


def test_default_is_lars_with_one_adapted_group():
    model = _model()
    opt = build_optimizer(model, OptimConfig(), lr=0.5)
    assert isinstance(opt, LARS)
    (group,) = opt.param_groups
    assert _ids(group) == [id(p) for p in model.parameters()]
    assert group["lars_adapt"] is True
    assert group["weight_decay"] == 1e-6 and group["lr"] == 0.5 and group["momentum"] == 0.9
    assert group["trust_coefficient"] == 0.001 and group["eps"] == 1e-8 and group["clip"] is False
    assert group["norm_process_group"] is None


def test_exclude_bn_bias_splits_groups():
    model = _model()
    cfg = OptimConfig(weight_decay=1e-5, lars=LarsConfig(exclude_bn_bias=True, clip=True))
    opt = build_optimizer(model, cfg, lr=0.1)
    adapted, plain = opt.param_groups
    conv, bn, fc = model[0], model[1], model[5]
    assert _ids(adapted) == [id(conv.weight), id(fc.weight)]
    assert _ids(plain) == [id(bn.weight), id(bn.bias), id(fc.bias)]
    assert adapted["lars_adapt"] is True and adapted["weight_decay"] == 1e-5
    assert plain["lars_adapt"] is False and plain["weight_decay"] == 0.0
    assert adapted["clip"] is True and (adapted["name"], plain["name"]) == ("adapted", "bn_bias")


def test_exclude_group_steps_like_sgd_without_decay():
    model = _model()
    cfg = OptimConfig(momentum=0.9, weight_decay=0.1, lars=LarsConfig(exclude_bn_bias=True))
    opt = build_optimizer(model, cfg, lr=0.1)
    before = model[1].weight.detach().clone()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    grad = model[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[1].weight.detach(), before - 0.1 * grad)


def test_sgd_when_lars_disabled():
    model = _model()
    cfg = OptimConfig(momentum=0.8, nesterov=True, weight_decay=1e-4,
                      lars=LarsConfig(enabled=False, exclude_bn_bias=True))
    opt = build_optimizer(model, cfg, lr=0.2)
    (group,) = opt.param_groups  # exclude_bn_bias is a LARS switch
    assert len(group["params"]) == 5 and group["lars_adapt"] is False
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.2, 0.8, True, 1e-4)
    # the same steps as torch.optim.SGD (the reference), and a skipped step changes nothing
    reference = _model()
    reference.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-4)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for m, o in ((model, opt), (reference, sgd)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.skip = torch.tensor(True)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and bool(opt.skipped)


def test_frozen_params_skipped_and_order_deterministic():
    model = _model()
    model[5].bias.requires_grad_(False)
    cfg = OptimConfig(lars=LarsConfig(exclude_bn_bias=True))
    first = build_optimizer(model, cfg, lr=0.1)
    second = build_optimizer(model, cfg, lr=0.1)
    assert id(model[5].bias) not in _ids(first.param_groups[1])
    assert [_ids(g) for g in first.param_groups] == [_ids(g) for g in second.param_groups]


def test_no_trainable_params_is_an_error():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model, OptimConfig(), lr=0.1)


def test_norm_process_group_needs_lars():
    with pytest.raises(ValueError, match="lars"):
        build_optimizer(_model(), OptimConfig(lars=LarsConfig(enabled=False)), 0.1, norm_process_group=object())
