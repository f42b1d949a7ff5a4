"""fairscale FSDP backend: what can be checked without CUDA.

The CUDA path cannot run here; tested are the refusal on CPU (before any
work) and the auto-wrap plan on meta-device models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config.loader import ConfigError
from harness.config.schema import ModelConfig, RunConfig
from harness.runtime import Runtime


class _Untouchable:
    """A stand-in method: any use of it means work started before the refusal."""

    def __getattr__(self, name):
        raise AssertionError(f"fairscale backend touched the model ({name}) before refusing")


def test_fairscale_refuses_cpu_before_building():
    from harness.parallel.build import build_engine

    cfg = RunConfig()
    cfg.parallel.backend = "fairscale"
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"parallel.backend=fairscale needs CUDA GPUs \(fairscale FSDP has no "
                                          r"CPU path\); use fsdp2 or deepspeed"):
        build_engine(_Untouchable(), cfg, rt, lr=0.1)


def test_apply_fairscale_refuses_cpu():
    from harness.parallel.fairscale_fsdp import apply_fairscale

    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        apply_fairscale(_Untouchable(), RunConfig(), Runtime(0, 1, 0, torch.device("cpu")))


def _meta_trunk(arch: str) -> nn.Module:
    from harness.models import build_trunk_from_config

    with torch.device("meta"):
        return build_trunk_from_config(ModelConfig(arch=arch))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_wrap_plan_small_model_stays_one_unit():
    from harness.parallel.fairscale_fsdp import wrap_plan

    trunk = _meta_trunk("regnety_200mf")
    assert wrap_plan(trunk, 100_000_000) == []  # 3M params: only the root unit (SEER's threshold)
    assert wrap_plan(trunk, 500_000) == ["trunk_output.block4"]


def test_wrap_plan_seer_10b_units_above_threshold():
    from harness.parallel.fairscale_fsdp import wrap_plan

    trunk = _meta_trunk("seer_10b")
    threshold = 100_000_000
    plan = wrap_plan(trunk, threshold)
    modules = dict(trunk.named_modules())
    assert len(plan) > 10
    assert all(_numel(modules[name]) >= threshold for name in plan)
    assert not any(isinstance(modules[name], nn.modules.batchnorm._BatchNorm) for name in plan)
    # children are listed before the parents that contain them (fairscale wraps bottom-up)
    for i, name in enumerate(plan):
        assert not any(other.startswith(name + ".") for other in plan[i + 1:])


class _Unit(nn.Module):
    """Stand-in for a fairscale FSDP unit (which needs CUDA): holds the module, forwards to it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrap_by_plan_nests_units_around_prewrapped_batchnorm():
    """As apply_fairscale does it: plan on the bare trunk, BN wrapped first, then the plan's
    units inner-first; every planned module ends up in one unit and the output is unchanged."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from harness.models import build_trunk_from_config
    from harness.parallel.fairscale_fsdp import wrap_by_plan, wrap_plan

    torch.manual_seed(0)
    trunk = build_trunk_from_config(ModelConfig(arch="regnety_200mf")).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = trunk(x)
    threshold = 100_000
    plan = wrap_plan(trunk, threshold)
    planned = {name: _numel(m) for name, m in trunk.named_modules() if name in plan}
    assert any(a.startswith(b + ".") for a in plan for b in plan), plan  # nested units at this threshold
    for name, module in list(trunk.named_modules()):
        if isinstance(module, _BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(trunk.get_submodule(parent), attr, _Unit(module))
    wrap_by_plan(trunk, plan, _Unit)
    units = [m for m in trunk.modules() if isinstance(m, _Unit) and not isinstance(m.module, _BatchNorm)]
    assert sorted(_numel(u) for u in units) == sorted(planned.values())
    assert all(_numel(u) >= threshold for u in units)
    assert torch.equal(trunk(x), expected)
