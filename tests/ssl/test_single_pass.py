"""swav.single_pass_pad: one trunk pass over all crops, small ones zero-padded, padding cut before pooling.

Checked against an independent computation: the crops padded with F.pad, the
trunk's res5 output from harness.models.features, and each crop's top-left
cells averaged by hand (the cell counts written out for these sizes).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config.schema import RegNetSpec, SwAVConfig
from harness.models.features import extract_features
from harness.models.zoo import build_trunk
from harness.ssl.swav import SwAV
from harness.ssl.swav.single_pass import padded_batch, valid_cells

B, LARGE, SMALL = 2, 96, 64  # res5 (stride 32): 3x3 cells for the large crops, the small ones keep 2x2
TINY = RegNetSpec(depth=4, w0=8, wa=16.0, wm=1.5, group_width=8, stem_width=8)  # 4 stages of 1 block, 64 wide


def _method(single_pass: bool) -> SwAV:
    torch.manual_seed(0)
    cfg = SwAVConfig(head_dims=[64, 32, 16], num_prototypes=[8], single_pass_pad=single_pass)
    return SwAV(build_trunk("regnet", TINY), cfg, num_crops=6)


def _crops() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, s, s, generator=g) for s in (LARGE, LARGE, SMALL, SMALL, SMALL, SMALL)]


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [t for m in module.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("padded, size", [(160, 96), (224, 96), (64, 32), (96, 64), (100, 37), (160, 160)])
def test_valid_cells_matches_vissls_interpolated_mask(padded, size):
    """VISSL: mask [H, W] True on padding, F.interpolate(mask[None].float(), size=out) -> bool, count of False."""
    for cells in {-(-padded // 32), -(-padded // 16), 7}:
        mask = torch.ones(1, padded, padded, dtype=torch.bool)
        mask[:, :size, :size] = False
        interp = F.interpolate(mask[None].float(), size=(cells, cells)).to(torch.bool)[0]
        assert valid_cells(padded, size, cells) == int((~interp[0, :, 0]).sum()), cells


def test_padded_batch_is_top_left_zero_padding():
    crops = _crops()
    expected = torch.cat([F.pad(c, (0, LARGE - c.shape[-1], 0, LARGE - c.shape[-2])) for c in crops])
    assert torch.equal(padded_batch(crops), expected)


def test_one_trunk_pass_and_pooled_features_of_the_unpadded_cells():
    method = _method(single_pass=True)
    reference = copy.deepcopy(method.trunk)  # same weights and BN state, run independently
    calls: list[tuple[int, ...]] = []
    method.trunk.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    crops = _crops()
    out = method(crops)
    assert calls == [(6 * B, 3, LARGE, LARGE)]  # one pass, everything padded to 96
    assert not method.trunk.avgpool._forward_hooks  # the cut is removed after the pass
    assert out.embeddings.shape == (6 * B, 16)

    padded = torch.cat([F.pad(c, (0, LARGE - c.shape[-1], 0, LARGE - c.shape[-2])) for c in crops])
    res5 = extract_features(reference, padded, taps=("res5",))["res5"]  # train mode: the same batch statistics
    assert res5.shape[-2:] == (3, 3)
    expected = torch.cat([res5[:2 * B].mean(dim=(2, 3)), res5[2 * B:, :, :2, :2].mean(dim=(2, 3))])
    features = method.trunk_features(crops)  # a second step on the same crops: BN normalises with batch stats
    torch.testing.assert_close(features, expected)
    # BN saw the padded batch: running statistics are those of the explicitly padded batch, twice
    extract_features(reference, padded, taps=("res5",))
    for got, want in zip(_bn_stats(method.trunk), _bn_stats(reference)):
        torch.testing.assert_close(got, want)


def test_bn_statistics_differ_from_the_grouped_forward():
    """The default updates BN once per resolution, from unpadded crops; the padded pass once, from a
    batch where 4 of 6 crops are mostly zeros: the stem's variance estimate drops."""
    padded, grouped = _method(single_pass=True), _method(single_pass=False)
    reference = copy.deepcopy(grouped.trunk)
    calls: list[int] = []
    grouped.trunk.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-1]))
    crops = _crops()
    padded(crops)
    grouped(crops)
    assert calls == [LARGE, SMALL]  # the default: one pass per resolution
    extract_features(reference, torch.cat(crops[:2]))
    extract_features(reference, torch.cat(crops[2:]))
    for got, want in zip(_bn_stats(grouped.trunk), _bn_stats(reference)):
        torch.testing.assert_close(got, want)
    stem_var_padded, stem_var_grouped = _bn_stats(padded.trunk)[1], _bn_stats(grouped.trunk)[1]
    # running_var after one update: 0.9 + 0.1 x batch variance; grouped: two updates
    batch_var_padded = (stem_var_padded - 0.9) / 0.1
    batch_var_grouped = (stem_var_grouped - 0.81) / 0.19  # 0.9 (0.9 + 0.1 v_L) + 0.1 v_S, v_L ~ v_S
    # zero-mean inputs: the variance shrinks by the unpadded share of pixels, (2 + 4 x (64/96)^2) / 6 = 0.63
    assert 0.55 < float(batch_var_padded.sum() / batch_var_grouped.sum()) < 0.72


def test_eval_mode_large_crops_unchanged_small_crops_see_the_padding():
    """Without batch statistics the large crops' features cannot depend on the padding; the small
    crops' border cells read the padding's activations instead of a convolution's zero padding."""
    padded, grouped = _method(single_pass=True).eval(), _method(single_pass=False).eval()
    crops = _crops()
    with torch.no_grad():
        a, b = padded.trunk_features(crops), grouped.trunk_features(crops)
    torch.testing.assert_close(a[:2 * B], b[:2 * B], rtol=1e-4, atol=1e-5)
    assert float((a[2 * B:] - b[2 * B:]).abs().max()) > 1e-3


def test_gradients_flow_through_the_cut():
    method = _method(single_pass=True)
    method.trunk_features(_crops()).sum().backward()
    assert all(p.grad is not None for p in method.trunk.parameters())


def test_a_trunk_without_a_global_pool_is_refused_at_construction():
    cfg = SwAVConfig(head_dims=[8, 8], num_prototypes=[4], single_pass_pad=True)
    with pytest.raises(ValueError, match="swav.single_pass_pad needs a trunk that ends in an AdaptiveAvgPool2d"):
        SwAV(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), cfg, num_crops=2)


# ------------------------------------------------------------- over ranks


def _padded_two_ranks(rank: int, world: int) -> dict:
    """The padded pass under DDP with SyncBN over both ranks and block checkpointing, fp64 (start-up
    dominates: one backend only; the hook sits outside the blocks every backend wraps)."""
    from tests.parallel._common import fp64_run

    torch.set_num_threads(1)
    return {"ddp": fp64_run(rank, world, "ddp", 2, 1, "swav.single_pass_pad=true",
                            "parallel.activation_checkpointing=true")}


def test_padded_pass_over_two_ranks_matches_one_process():
    """SyncBN over 2 ranks of 2 images each sees the padded batch of 4 that one process sees: one step
    agrees within 1e-5 (losses, parameters and BN statistics, the tolerances
    tests/parallel/test_torch_backends.py compares backends with)."""
    import numpy as np

    from tests.distributed import run_distributed
    from tests.parallel._common import fp64_run

    one = fp64_run(0, 1, "none", 4, 1, "swav.single_pass_pad=true")
    grouped = fp64_run(0, 1, "none", 4, 1)
    assert abs(one["losses"][0] - grouped["losses"][0]) > 1e-4  # the option changes the step at all
    results = run_distributed(_padded_two_ranks, 2)
    for key in ("ddp",):
        for r in results:
            assert r[key]["losses"] == pytest.approx(one["losses"], rel=1e-5), key
        for name, want in {**one["params"], **one["bn"]}.items():
            got = {**results[0][key]["params"], **results[0][key]["bn"]}[name]
            assert float(np.abs(got - want).max()) <= 1e-5 * max(float(np.abs(want).max()), 1e-12), (key, name)
