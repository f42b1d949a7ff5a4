"""The SwAV module: one trunk pass per resolution, freezing, and a learning sanity check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config.schema import SwAVConfig
from harness.profiling.ops import count_syncs
from harness.ssl.swav import SwAV, SwAVOutput, resolution_groups


class TinyTrunk(nn.Module):
    """Conv -> ReLU -> global pool: images [N,3,H,W] -> [N, width]; counts its calls."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def make(freeze: int = 0, counts: list[int] | None = None, seed: int = 0) -> SwAV:
    torch.manual_seed(seed)
    cfg = SwAVConfig(
        head_dims=[8, 16, 6], num_prototypes=counts or [10], crops_for_assign=[0, 1], freeze_prototypes_iters=freeze
    )
    return SwAV(TinyTrunk(8), cfg, num_crops=6)


def crops(B: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 16, 16, generator=g) for _ in range(4)
    ]


def test_resolution_groups() -> None:
    x = [torch.zeros(1, 3, s, s) for s in (32, 32, 16, 16, 16, 32)]
    assert resolution_groups(x) == [(0, 2), (2, 5), (5, 6)]


def test_one_trunk_call_per_resolution_and_shapes() -> None:
    model = make(counts=[10, 7])
    views = crops(B=4)
    out = model(views)
    assert model.trunk.calls == [(8, 3, 32, 32), (16, 3, 16, 16)]
    assert isinstance(out, SwAVOutput)
    assert out.embeddings.shape == (24, 6)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(24))
    assert [tuple(s.shape) for s in out.scores] == [(24, 10), (24, 7)]
    # Crop-major order: rows of crop 3 are the embeddings of crop 3 alone.
    alone = nn.functional.normalize(model.head(model.trunk(views[3])), dim=1)
    torch.testing.assert_close(out.embeddings[12:16], alone)


def test_loss_finite_and_backprop_reaches_trunk() -> None:
    model = make()
    loss, metrics = model.training_step(crops(), iteration=0)
    assert torch.isfinite(loss) and isinstance(metrics["loss"], torch.Tensor)  # read by the caller, when it logs
    assert not metrics["loss"].requires_grad and metrics["loss"].item() == loss.item()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters())
    assert model.prototypes.heads[0].weight.grad is not None


def test_wrong_crop_count() -> None:
    with pytest.raises(ValueError, match="expected 6 crops"):
        make()(crops()[:5])


def test_prototype_freezing() -> None:
    model = make(freeze=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.0)
    proto0 = model.prototypes.heads[0].weight.detach().clone()
    trunk0 = model.trunk.conv.weight.detach().clone()
    for it in range(3):
        opt.zero_grad()
        model.training_step(crops(seed=it), it)[0].backward()
        assert model.prototypes.heads[0].weight.grad is not None
        model.cancel_prototype_gradients(it)
        assert model.prototypes.heads[0].weight.grad is None
        before = model.prototypes.heads[0].weight.detach().clone()
        opt.step()
        assert torch.equal(model.prototypes.heads[0].weight, before)  # skipped by SGD
        model.normalize_prototypes()
    # Renormalising unit rows may move them by rounding only.
    torch.testing.assert_close(model.prototypes.heads[0].weight.detach(), proto0, rtol=0, atol=1e-6)
    assert (model.trunk.conv.weight - trunk0).abs().max() > 1e-3
    # At the threshold gradients are left alone and the prototypes move.
    opt.zero_grad()
    model.training_step(crops(seed=3), 3)[0].backward()
    grad = model.prototypes.heads[0].weight.grad.clone()
    model.cancel_prototype_gradients(3)
    assert torch.equal(model.prototypes.heads[0].weight.grad, grad)
    opt.step()
    assert (model.prototypes.heads[0].weight - proto0).abs().max() > 1e-3


def test_loss_decreases_on_fixed_batch() -> None:
    model = make(seed=1)
    views = crops(B=8, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for it in range(20):
        opt.zero_grad()
        loss, _ = model.training_step(views, it)
        loss.backward()
        model.cancel_prototype_gradients(it)
        opt.step()
        model.normalize_prototypes()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 15, losses  # mostly monotone


def test_ddp_wrapper_keeps_per_rank_queue() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    cfg = SwAVConfig(head_dims=[8, 6], num_prototypes=[10], queue_length=8)
    model = SwAV(TinyTrunk(8), cfg, num_crops=6)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert {"criterion.queue", "criterion.queue_count"} <= set(ddp.parameters_to_ignore)
        loss, metrics = model.training_step(crops(), 0, forward=ddp)
        loss.backward()
        assert metrics["queue_active"] == 0.0 and int(model.criterion.queue_count) == 4
        assert model.trunk.conv.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_parallel_spec_declares_what_backends_apply() -> None:
    """The spec names real submodules and parameters; its step rules do what the method's own do."""
    from harness.config import load_config

    cfg = load_config("quickstart", ["swav.head_batchnorm=true", "swav.head_dims=[368, 32, 32, 16]",
                                     "swav.num_prototypes=[10, 7]", "swav.freeze_prototypes_iters=3"])
    with torch.device("meta"):
        model = SwAV.from_config(cfg, num_crops=4)
    spec = model.parallel_spec()
    assert spec.sync_bn == ("trunk", "head") and spec.fp32 == ("prototypes",)
    assert spec.stages == tuple(f"trunk.trunk_output.block{i}" for i in range(1, 5))
    assert spec.units == ("trunk.stem", "head")
    for name in (*spec.sync_bn, *spec.stages, *spec.units, *spec.fp32):
        model.get_submodule(name)
    protos = ["prototypes.heads.0.weight", "prototypes.heads.1.weight"]
    assert spec.frozen_at(2) == protos and spec.frozen_at(3) == []
    assert list(spec.after_step[0].params) == protos and spec.after_step[0].whole_rows
    assert set(spec.init) == {n for n, _ in model.named_parameters()}
    assert spec.init["prototypes.heads.0.weight"].unit_rows
    assert spec.init["trunk.stem.0.weight"].kind == "normal" and spec.init["head.0.weight"].kind == "uniform"
    rows = torch.randn(5, 4) * 3
    spec.after_step[0].fn(rows)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5))


def test_parallel_spec_of_a_trunk_without_stages() -> None:
    spec = make().parallel_spec()  # TinyTrunk: no stages, no stem; a head with parameters
    assert spec.stages == () and spec.units == ("head",)



def test_sync_counter_sees_every_kind_of_read() -> None:
    """The counter the next test relies on is not blind (positive control)."""
    t = torch.tensor([1.0, 0.0])
    with count_syncs() as c:
        float(t[0]), int(t[0]), bool(t[0]), t[0].item(), t.tolist(), t.nonzero(), [1, 2][t[0].long()]
    assert {"Tensor.__float__", "Tensor.__int__", "Tensor.__bool__", "Tensor.item", "Tensor.tolist",
            "Tensor.__index__", "aten._local_scalar_dense", "aten.nonzero"} <= set(c.syncs)


def test_training_step_reads_nothing_back_from_the_device() -> None:
    """Forward, loss (queue active: its scores, Sinkhorn, the enqueue) and backward: no host sync."""
    torch.manual_seed(0)
    cfg = SwAVConfig(head_dims=[8, 6], num_prototypes=[10, 7], queue_length=8, queue_start_iter=1,
                     crops_for_assign=[0, 1])
    model = SwAV(TinyTrunk(8), cfg, num_crops=6)
    for it in range(2):
        model.training_step(crops(seed=it), it)
    assert model.criterion.queue_active(2) and int(model.criterion.queue_count) == 8
    queue = model.criterion.queue.clone()
    with count_syncs() as c:
        loss, metrics = model.training_step(crops(seed=2), 2)
        loss.backward()
    assert dict(c.syncs) == {}
    assert metrics["queue_active"] == 1.0 and not torch.equal(model.criterion.queue, queue)  # it did run
    assert model.prototypes.heads[1].weight.grad is not None
