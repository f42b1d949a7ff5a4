"""Feature taps on RegNet and ResNet trunks."""

from __future__ import annotations

import pytest
import torch

from harness.models import TAPS, build_trunk, extract_features


@pytest.fixture(scope="module", params=["regnety_200mf", "resnet50"])
def trunk(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_trunk(request.param).eval()


def test_tap_shapes_and_pool_equals_trunk(trunk: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = extract_features(trunk, x, TAPS)
        expected = trunk(x)
    assert list(feats) == list(TAPS)
    for tap, stride in zip(TAPS[:4], (4, 8, 16, 32)):
        assert feats[tap].shape[-2:] == (64 // stride, 64 // stride), tap
    assert feats["res5"].shape[1] == expected.shape[1]
    torch.testing.assert_close(feats["pool"], expected, rtol=0, atol=0)


def test_stops_after_deepest_tap(trunk: torch.nn.Module) -> None:
    last_stage = trunk.trunk_output.block4 if hasattr(trunk, "trunk_output") else trunk.layer4
    calls = []
    handle = last_stage.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            feats = extract_features(trunk, torch.randn(1, 3, 32, 32), taps=("res3", "res2"))
    finally:
        handle.remove()
    assert set(feats) == {"res2", "res3"} and not calls


def test_unknown_tap_lists_valid_ones() -> None:
    with torch.device("meta"):
        trunk = build_trunk("regnety_200mf")
    with pytest.raises(ValueError, match="res2, res3, res4, res5, pool"):
        extract_features(trunk, torch.empty(1, 3, 32, 32, device="meta"), taps=("avgpool",))


def test_rejects_unsupported_module() -> None:
    with pytest.raises(TypeError, match="RegNet and ResNet"):
        extract_features(torch.nn.Linear(3, 3), torch.randn(1, 3))
