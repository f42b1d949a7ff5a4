"""fairscale FSDP backend: what can be checked without CUDA.

The CUDA path cannot run here; tested are the refusal on CPU (before any
work), the unit plan (VISSL's units) on meta-device models, and the
materialise-as-you-wrap loop with a stand-in for the FSDP wrapper.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.runtime import Runtime


class _Untouchable:
    """A stand-in method: any use of it means work started before the refusal."""

    def __getattr__(self, name):
        raise AssertionError(f"fairscale backend touched the model ({name}) before refusing")


def test_fairscale_refuses_cpu_before_building(monkeypatch):
    from harness.parallel.build import build_engine
    from harness.ssl.swav import SwAV

    monkeypatch.setattr(SwAV, "from_config", _Untouchable)  # building the method would fail the test
    cfg = RunConfig()
    cfg.parallel.backend = "fairscale"
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"parallel.backend=fairscale needs CUDA GPUs \(fairscale FSDP has no "
                                          r"CPU path\); use fsdp2 or deepspeed"):
        build_engine(cfg, rt, lr=0.1, num_crops=4)


def test_apply_fairscale_refuses_cpu():
    from harness.parallel.fairscale_fsdp import apply_fairscale

    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        apply_fairscale(_Untouchable(), _Untouchable(), RunConfig(), Runtime(0, 1, 0, torch.device("cpu")))


def _meta_method(preset: str, *overrides: str):
    from harness.config import load_config
    from harness.ssl.swav import SwAV

    cfg = load_config(preset, list(overrides))
    with torch.device("meta"):
        method = SwAV.from_config(cfg, 4)
    return method, method.parallel_spec(), cfg


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_inner_first(plan: list[str]) -> None:
    for i, name in enumerate(plan):  # a unit is never listed after a unit that holds it
        assert not any(name.startswith(outer + ".") for outer in plan[:i]), name


def test_unit_plan_every_block_then_stem_and_head():
    """VISSL's units at SEER's threshold on a small trunk: no conv is big enough, every block is a unit."""
    from harness.parallel.fairscale_fsdp import unit_plan

    method, spec, cfg = _meta_method("quickstart")
    plan = unit_plan(method, spec, cfg)
    blocks = [f"{s}.{b}" for s in spec.stages for b, _ in method.get_submodule(s).named_children()]
    assert plan == [*blocks, "trunk.stem", "head"]
    assert "prototypes" not in plan  # an fp32 unit of its own


def test_unit_plan_wraps_big_convs_inside_their_block():
    from harness.parallel.fairscale_fsdp import unit_plan

    method, spec, cfg = _meta_method("quickstart", "parallel.wrap_min_params=100000")
    plan = unit_plan(method, spec, cfg)
    modules = dict(method.named_modules())
    convs = [n for n in plan if isinstance(modules[n], nn.Conv2d)]
    every_big = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and _numel(m) >= 100_000]
    assert convs and sorted(convs) == sorted(every_big)
    _assert_inner_first(plan)
    assert not any(isinstance(modules[n], nn.modules.batchnorm._BatchNorm) for n in plan)


def test_unit_plan_seer_10b():
    """SEER-10B as its preset runs it: 27 blocks, the convs of 1e8+ parameters inside them, the
    checkpoint groups that are whole stages (stage_checkpoints [[2], [7], [9, 17], []])."""
    from harness.parallel.fairscale_fsdp import unit_plan

    method, spec, cfg = _meta_method("seer_10b")
    plan = unit_plan(method, spec, cfg)
    modules = dict(method.named_modules())
    assert cfg.parallel.stage_checkpoints == [[2], [7], [9, 17], []] and cfg.parallel.wrap_min_params == 10**8
    blocks = [f"{s}.{b}" for s in spec.stages for b, _ in method.get_submodule(s).named_children()]
    assert len(blocks) == 27 and set(blocks) <= set(plan)
    assert [n for n in plan if n in spec.stages] == list(spec.stages[:2])  # groups 0-2 and 0-7: whole stages
    convs = [n for n in plan if isinstance(modules[n], nn.Conv2d)]
    assert convs and all(_numel(modules[n]) >= 10**8 for n in convs)
    _assert_inner_first(plan)
    taken: set[int] = set()
    own = []  # what each unit shards itself (inner units first), the root last
    for unit in [*(modules[n] for n in plan), *(modules[n] for n in spec.fp32), method]:
        params = [p for p in unit.parameters() if id(p) not in taken]
        taken.update(id(p) for p in params)
        own.append(sum(p.numel() for p in params))
    assert max(own) < _numel(method) / 10 and own[-1] < 10**7  # nothing near the whole model, the root least


class _Unit(nn.Module):
    """Stand-in for a fairscale FSDP unit (which needs CUDA): holds the module, forwards to it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrap_as_built_materialises_unit_by_unit_with_the_one_process_weights():
    """As apply_fairscale does it, with a stand-in wrapper: each unit is real when it is wrapped,
    while the rest of the model is still on meta (fewer tensors each time); at the end every
    parameter equals the one-process build's and the forward is unchanged."""
    from harness.parallel.fairscale_fsdp import clean_name, wrap_as_built
    from harness.ssl.swav import SwAV
    from tests.parallel._common import make_cfg, one_process_method

    cfg = make_cfg("fairscale", 2, "parallel.wrap_min_params=100000")
    reference = one_process_method(cfg).eval()
    with torch.device("meta"):
        method = SwAV.from_config(cfg, 4)
    spec = method.parallel_spec()
    meta_left: list[int] = []

    def wrap(module: nn.Module) -> nn.Module:
        assert all(p.device.type == "cpu" for p in module.parameters())
        meta_left.append(sum(p.device.type == "meta" for p in method.parameters()))
        return _Unit(module)

    root = wrap_as_built(method, spec, cfg, torch.device("cpu"), wrap, wrap)
    total = sum(1 for _ in reference.parameters())
    assert len(meta_left) > 40 and meta_left == sorted(meta_left, reverse=True)
    assert meta_left[0] >= total - 2 and meta_left[len(meta_left) // 2] > 0 and meta_left[-1] == 0
    got = {clean_name(n.replace("module.", "")): p for n, p in root.named_parameters()}
    expected = dict(reference.named_parameters())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(2, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    root.eval()
    for a, b in zip(root(crops).scores, reference(crops).scores):
        assert torch.equal(a, b)


def test_clean_name_drops_fairscale_levels():
    from harness.parallel.fairscale_fsdp import clean_name

    assert clean_name("_fsdp_wrapped_module._fpw_module.trunk.stem._fsdp_wrapped_module._fpw_module.0.weight") == \
        "trunk.stem.0.weight"
    assert clean_name("head.0.bias") == "head.0.bias"
