"""NCCL's cost model (collectives.py) against hand-computed values from NCCL's tuning.cc
formulas, its scaling with ranks, the algorithm the tuner picks, and the planner's weak scaling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from harness.profiling.collectives import (Fabric, fastest, ring_all_gather, ring_all_reduce,
                                           ring_reduce_scatter, tree_all_reduce)

torch.set_num_threads(1)

US = 1e-6
H100_INTRA, H100_INTER = 370.0, 340.0  # the h100-80gb profile's bus bandwidths, GB/s


def nodes(m: int, per_node: int = 8, bus: float = H100_INTER, cc: float = 9.0) -> Fabric:
    return Fabric(ranks=m * per_node, nodes=m, bus_gbps=bus if m > 1 else H100_INTRA, compute_capability=cc)


# ------------------------------------------------------------------ closed forms

def test_ring_all_reduce_in_one_node_by_hand() -> None:
    # Simple: baseLat 8.4 + 2(n-1) = 14 NVLink hops x 3.4 us; 1 GB x 2(n-1)/n at 370 GB/s
    t = ring_all_reduce(1e9, Fabric(8, 1, H100_INTRA), "Simple")
    assert t == pytest.approx((8.4 + 14 * 3.4) * US + 1e9 * 14 / 8 / 370e9, rel=1e-12)


def test_ring_all_gather_across_nodes_by_hand() -> None:
    # 4 nodes x 8: 31 steps, 3 of them between nodes (14 us each), the other 28 at NVLink's 3.4 us
    # (above the 3 x 1 us network overhead); 64 MB x 31/32 at 340 GB/s
    t = ring_all_gather(64e6, nodes(4), "Simple")
    assert t == pytest.approx((8.4 + 28 * 3.4 + 3 * 14.0) * US + 64e6 * 31 / 32 / 340e9, rel=1e-12)
    assert ring_reduce_scatter(64e6, nodes(4), "Simple") == t  # same ring, same steps


def test_tree_all_reduce_small_payload_by_hand() -> None:
    # LL: baseLat 6.8 + 2 x (7 NVLink hops x 0.6 + log2(16) = 4 network hops x 5.0);
    # bus 340 x 0.92 / 3.8 = 82.3, capped at llMaxBw 20.4 GB/s (more than 2 nodes), x tree
    # correction 0.7 for 4 KB (log2(4096 / 64) = 6); algorithm bandwidth half the bus
    t = tree_all_reduce(4096, nodes(16), "LL")
    assert t == pytest.approx((6.8 + 2 * (7 * 0.6 + 4 * 5.0)) * US + 2 * 4096 / (20.4e9 * 0.7), rel=1e-12)


def test_ring_plateau_before_and_after_ampere() -> None:
    """NCCL multiplies a multi-node Simple ring all-reduce's latency by 1.9 before Ampere, 1.4 after."""
    payload = 1e9
    for cc, factor in ((7.0, 1.9), (9.0, 1.4)):
        f = nodes(2, cc=cc)
        latency = (8.4 + (30 - 4) * 3.4 + 4 * 14.0) * US  # 2(n-1) = 30 steps, 2 x nodes = 4 inter
        assert ring_all_reduce(payload, f, "Simple") == pytest.approx(
            factor * latency + payload * 30 / 16 / 340e9, rel=1e-12)


def test_gloo_rings_pay_their_hop_latency() -> None:
    f = Fabric(4, 4, bus_gbps=1.2, link="gloo", hop_us=100.0)
    assert fastest("all_reduce", 1e6, f).seconds == pytest.approx(6 * 100e-6 + 1e6 * 6 / 4 / 1.2e9)
    assert fastest("all_reduce", 1e6, f).algorithm == "ring"


# ------------------------------------------------------------------ scaling

def _latency(fn, m: int, protocol: str) -> float:
    return fn(0.0, nodes(m), protocol)  # an empty payload: latency alone


@pytest.mark.parametrize("fn", [ring_all_gather, ring_reduce_scatter, ring_all_reduce])
@pytest.mark.parametrize("protocol", ["LL", "LL128", "Simple"])
def test_ring_latency_grows_linearly_with_ranks(fn, protocol: str) -> None:
    counts = [2, 4, 8, 16, 32, 64, 128, 256, 512]
    lat = [_latency(fn, m, protocol) for m in counts]
    slopes = [(b - a) / (mb - ma) for a, b, ma, mb in zip(lat, lat[1:], counts, counts[1:])]
    assert slopes == pytest.approx([slopes[0]] * len(slopes), rel=1e-9)  # a straight line in the ranks
    assert lat[-1] > 100 * lat[0]  # 512 nodes: some 200-280x the latency of 2
    intra = {"LL": 1.0, "LL128": 1.9, "Simple": 3.4}[protocol]  # max(NVLink hop, network overhead)
    inter = {"LL": 2.7, "LL128": 4.0, "Simple": 14.0}[protocol]
    if fn is ring_all_reduce:  # 2(8m-1) steps, 2m of them between nodes: (14m-2) intra + 2m inter
        expected = 14 * intra + 2 * inter
    else:  # 8m-1 steps, m-1 between nodes: 7m intra + (m-1) inter
        expected = 7 * intra + inter
    assert slopes[0] == pytest.approx(expected * US, rel=1e-9)


@pytest.mark.parametrize("protocol, hop", [("LL", 5.0), ("LL128", 8.5), ("Simple", 28.0)])
def test_tree_latency_grows_with_log_of_nodes(protocol: str, hop: float) -> None:
    lat = {m: _latency(tree_all_reduce, m, protocol) for m in (2, 4, 8, 64, 128, 512)}
    # each doubling of the nodes adds one level: two network hops (reduce up, broadcast down)
    for m in (2, 4, 64):
        assert lat[2 * m] - lat[m] == pytest.approx(2 * hop * US, rel=1e-9)
    assert lat[512] - lat[2] == pytest.approx(8 * 2 * hop * US, rel=1e-9)  # log2 512 - log2 2 = 8 levels
    ring = _latency(ring_all_reduce, 512, protocol)
    assert ring > 10 * lat[512]  # 8,190 ring steps vs 2 x 9 tree levels


def test_all_reduce_picks_tree_small_at_scale_and_ring_large_in_a_node() -> None:
    small = fastest("all_reduce", 1024, nodes(512))
    assert small.algorithm == "tree" and small.protocol == "LL"
    assert small.seconds == pytest.approx(tree_all_reduce(1024, nodes(512), "LL"))
    large = fastest("all_reduce", 1e9, Fabric(8, 1, H100_INTRA))
    assert (large.algorithm, large.protocol) == ("ring", "Simple")
    assert large.seconds < tree_all_reduce(1e9, Fabric(8, 1, H100_INTRA), "Simple")
    # all-gather has only the ring; LL128 runs over NVLink only
    assert fastest("all_gather", 1e6, nodes(64)).algorithm == "ring"
    assert "LL128" not in {fastest("all_reduce", b, dataclasses.replace(nodes(2), link="pci")).protocol
                           for b in (1e3, 1e5, 1e7, 1e9)}


def test_unknown_collective_is_named() -> None:
    with pytest.raises(ValueError, match="unknown collective 'broadcast': expected all_gather"):
        fastest("broadcast", 1.0, nodes(2))


# ------------------------------------------------------------------ the planner

@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_seer_weak_scaling_slows_the_step(backend: str) -> None:
    """Fixed per-GPU batch: compute stays, collectives grow with the ranks. fsdp2's rings
    (one all-gather and reduce-scatter per unit over every rank) grow linearly; ddp's
    all-reduces turn into trees and hide behind backward, its SyncBN and Sinkhorn stay exposed."""
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.records import Strategy
    from harness.profiling.timing import predict_time  # the planner's time model (planner.predict)

    cfg = load_config("seer_regnety_8gf")
    s = dataclasses.replace(Strategy.from_config(cfg), backend=backend)
    h100 = get_device("h100-80gb")
    times = [predict_time(cfg, s, h100, n) for n in (8, 64, 512, 4096)]
    steps = [t.step for t in times]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert len({t.forward for t in times}) == 1  # weak scaling: the same compute per GPU
    if backend == "fsdp2":
        assert steps[-1] > 2 * steps[0]
        assert times[-1].communication > 20 * times[0].communication


def test_hsdp_replicas_use_one_nic_each() -> None:
    """An HSDP replica group holds one rank per node: every ring step crosses the network."""
    from harness.profiling.devices import get_device
    from harness.profiling.timing import Collective, fabric

    f = fabric(Collective("all_reduce", 1e6, 64, 1, "backward", stride=8), get_device("h100"))
    assert (f.ranks, f.nodes, f.per_node) == (64, 64, 1)
    assert f.bus_gbps == pytest.approx(340.0 / 8)
    t = ring_all_reduce(0.0, f, "Simple")
    assert t == pytest.approx((8.4 + 126 * 14.0) * US)  # all 2(n-1) steps between nodes
    assert math.isclose(fastest("all_reduce", 0.0, f).seconds, min(
        fn(0.0, f, p) for fn in (ring_all_reduce, tree_all_reduce) for p in ("LL", "LL128", "Simple")))


def test_device_yaml_link_and_compute_capability() -> None:
    """User profiles pick NCCL's tables by `link` and `compute_capability`; a wrong link is one line."""
    from harness.profiling.devices import device_from_dict, device_to_dict, get_device

    data = {**device_to_dict(get_device("v100")), "link": "pci", "name": "V100-PCIe"}
    d = device_from_dict(data)
    assert (d.link, d.compute_capability) == ("pci", 7.0) and device_from_dict(device_to_dict(d)) == d
    with pytest.raises(ValueError, match=r"link must be one of nvlink, pci, gloo .* got 'infiniband'$"):
        device_from_dict({**data, "link": "infiniband"}, "my.yaml")
