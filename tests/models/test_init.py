"""Initial weights as a pure function of (seed, name, shape): slices, rules, materialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.models import build_trunk
from harness.models.init import (
    CHUNK, InitRule, default_rules, init_weights_, initial_values, materialize_, normal, torchvision_rules, uniform,
    unit_rows,
)


@pytest.mark.parametrize("rule", [normal(0.0, 0.3), uniform(0.5), unit_rows(uniform(0.5))], ids=str)
def test_any_slice_equals_the_same_elements_of_the_full_tensor(rule: InitRule):
    """Slices that start and end inside chunks, across chunk boundaries and inside rows."""
    shape = (2 * CHUNK // 1000 + 7, 1000)  # ~2.1M elements: three chunks
    full = initial_values(rule, "w", shape, seed=3)
    for start, stop in [(0, 10), (CHUNK - 5, CHUNK + 5), (CHUNK + 1, 2 * CHUNK + 1), (1234, 5678),
                        (full.numel() - 3, full.numel()), (999, 1001)]:
        assert torch.equal(initial_values(rule, "w", shape, 3, start, stop), full[start:stop]), (start, stop)
    assert not torch.equal(full, initial_values(rule, "w", shape, seed=4))  # the seed matters
    assert not torch.equal(full, initial_values(rule, "v", shape, seed=3))  # and the name


def test_unit_rows_are_unit_and_dtype_is_applied():
    values = initial_values(unit_rows(uniform(0.25)), "p", (5, 8), 0, dtype=torch.float64)
    assert values.dtype == torch.float64
    torch.testing.assert_close(values.view(5, 8).norm(dim=1), torch.ones(5, dtype=torch.float64))


def _regnet_with_se_biases() -> nn.Module:
    return build_trunk("regnety_200mf")


def test_torchvision_rules_match_torchvision_init_statistics():
    """Against torchvision's own RegNet init (its constructor's loops, run here with a seed):
    the same constants, and per tensor the same distribution (mean and std within sampling error)."""
    torch.manual_seed(0)
    reference = _regnet_with_se_biases()
    rules = torchvision_rules(reference)
    assert set(rules) == {n for n, _ in reference.named_parameters()}
    ours = _regnet_with_se_biases()
    init_weights_(ours, rules, seed=0)
    checked = 0
    for (name, ref), (_, got) in zip(reference.named_parameters(), ours.named_parameters()):
        ref, got = ref.detach(), got.detach()
        if rules[name].kind == "constant":
            assert torch.equal(ref, got), name
            continue
        if ref.numel() < 2000:
            continue
        n = ref.numel()
        tol = 6 * float(ref.std()) / math.sqrt(n)
        assert abs(float(got.mean()) - float(ref.mean())) <= tol, name
        assert abs(float(got.std()) / float(ref.std()) - 1) <= 6 / math.sqrt(n), name
        checked += 1
    assert checked > 20
    se_bias = next(n for n in rules if n.endswith("se.fc1.bias"))
    assert rules[se_bias].kind == "uniform"  # torchvision leaves SE conv biases at torch's default


def test_default_rules_are_torch_linear_init():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(300, 400), nn.BatchNorm1d(400))
    rules = default_rules(head, "head")
    bound = 1 / math.sqrt(300)
    assert rules["head.0.weight"] == uniform(bound) and rules["head.0.bias"] == uniform(bound)
    assert rules["head.1.weight"].a == 1.0 and rules["head.1.bias"].a == 0.0
    w = initial_values(rules["head.0.weight"], "head.0.weight", (400, 300), 0)
    assert w.abs().max() <= bound and abs(float(w.std()) - float(head[0].weight.detach().std())) < 0.02 * bound


def test_a_parameter_without_rule_is_named():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match=r"no initialisation rule for Odd.scale \(trunk.scale\)"):
        torchvision_rules(Odd(), "trunk")


def test_materialize_from_meta_equals_init_in_place_and_restarts_buffers():
    with torch.device("meta"):
        meta = _regnet_with_se_biases()
    rules = torchvision_rules(meta)
    materialize_(meta, "cpu", rules, seed=7)
    real = _regnet_with_se_biases()
    init_weights_(real, rules, seed=7)
    for (name, a), (_, b) in zip(meta.named_parameters(), real.named_parameters()):
        assert a.device.type == "cpu" and torch.equal(a, b), name
    bns = [m for m in meta.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) and
                       torch.equal(m.running_var, torch.ones_like(m.running_var)) and
                       int(m.num_batches_tracked) == 0 for m in bns)
