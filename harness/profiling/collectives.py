"""How long one NCCL collective call takes: NCCL's own cost model, one function per algorithm.

Why NCCL's model and not a generic alpha-beta: NCCL picks, for every call,
the algorithm and protocol its tuner predicts fastest, and the tuner's
prediction is a latency that depends on the algorithm (a ring pays one hop
per step, n-1 or 2(n-1) steps; a tree pays 2 log2(nodes) network hops) plus
the payload over a bus bandwidth. Reusing NCCL's formulas and constants is
the closest published description of what a real job does at 8 and at
4,096 GPUs. Source: NVIDIA/nccl src/graph/tuning.cc (`ncclTopoTuneModel`,
`ncclTopoGetAlgoTime`) as of NCCL 2.20.3; every constant below is copied
from there, in microseconds and GB/s:

* ``BASE_US``: ``baseLat`` per algorithm and protocol (LL, LL128, Simple).
* ``HOP_US``: ``hwLat`` per hop, for NVLink and PCI inside a node and for
  the network between nodes.
* Ring (all-gather, reduce-scatter: n-1 steps; all-reduce: 2(n-1) steps):
  base + (steps - inter steps) x intra hop + inter steps x network hop, the
  inter steps being nodes-1 (all-gather, reduce-scatter) or 2 x nodes
  (all-reduce); across nodes an intra hop costs at least the network post
  overhead (1 us on Intel hosts, x3 for Simple). The all-reduce ring's
  latency is multiplied by 1.9 (before Ampere) or 1.4 (the "plateau
  effect") once the payload is large.
* Tree (all-reduce only): base + 2 x ((ranks per node - 1) x intra hop +
  floor(log2(nodes)) x network hop).
* Time = latency + payload / algorithm bandwidth. The bus bandwidth (the
  nccl-tests convention, NVIDIA/nccl-tests doc/PERFORMANCE.md: all-reduce
  moves 2(n-1)/n of the payload per rank, all-gather and reduce-scatter
  (n-1)/n) is what `Fabric.bus_gbps` holds; a ring turns it into time with
  those factors, a tree moves 2x the payload at 0.92 of it, scaled by NCCL's
  per-size `treeCorrectionFactor`. LL runs at 1/4 of the bus bandwidth (1/3
  for a one-node all-gather/reduce-scatter; trees 1/3.8), capped at
  ``llMaxBws``; LL128 at 0.92 (0.7 with one rank per node; trees 7/9 in a
  node, 120/128 across) and only over NVLink (NCCL enables it there only).

Not modelled: NCCL's per-channel bandwidth caps (they need the channel
count), CollNet/SHARP and NVLS (NVLink SHARP), which need switch support
the builtin profiles do not assume, and AMD hosts' larger network overhead.
"Demystifying NCCL" (Hu et al., arXiv:2507.04786, 2025) walks through the
same algorithms and protocols in NCCL 2.19 and measures them on GH200
nodes: rings win for large messages and trees for small ones, LL/LL128
win small messages across nodes and Simple large ones, which is the choice
`fastest` reproduces.

gloo (the CPU profile) has no such tuner: its collectives are rings whose
steps each cost `Fabric.hop_us`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

PROTOCOLS = ("LL", "LL128", "Simple")
#: tuning.cc baseLat, us.
BASE_US = {"tree": {"LL": 6.8, "LL128": 14.0, "Simple": 0.0},
           "ring": {"LL": 6.6, "LL128": 14.0, "Simple": 8.4}}
#: tuning.cc hwLat, us per hop: NCCL_HW_NVLINK, NCCL_HW_PCI, NCCL_HW_NET.
HOP_US = {
    "nvlink": {"tree": {"LL": 0.6, "LL128": 1.25, "Simple": 28.0}, "ring": {"LL": 0.6, "LL128": 1.9, "Simple": 3.4}},
    "pci": {"tree": {"LL": 1.0, "LL128": 1.9, "Simple": 28.0}, "ring": {"LL": 1.0, "LL128": 2.5, "Simple": 5.7}},
    "net": {"tree": {"LL": 5.0, "LL128": 8.5, "Simple": 28.0}, "ring": {"LL": 2.7, "LL128": 4.0, "Simple": 14.0}},
}
#: getNetOverhead on an Intel x86 host (AMD: 2.0), x3 for Simple.
NET_OVERHEAD_US = 1.0
#: ncclTopoGetAlgoTime: ring all-reduce latency factor across nodes for payloads of at least
#: 64 bytes per rank and channel (we take PLATEAU_CHANNELS channels).
PLATEAU_PRE_AMPERE, PLATEAU, PLATEAU_CHANNELS = 1.9, 1.4, 16
#: llMaxBws, GB/s: one node by GPU generation (Volta, Ampere and later), several by node count
#: (Intel hosts: 2 nodes, more).
LL_MAX_ONE_NODE = {7: 39.0, 8: 87.7}
LL_MAX_TWO_NODES, LL_MAX_MORE_NODES = 39.0, 20.4
TREE_BW = 0.92  # tree busBw = 0.92 x the link's
#: treeCorrectionFactor[protocol][log2(bytes / 64)], 64 B to 256 MB.
TREE_CORRECTION = {
    "LL": (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0),
    "LL128": (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0),
    "Simple": (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9),
}


@dataclass(frozen=True)
class Fabric:
    """The ranks of one communicator and what connects them."""

    ranks: int
    nodes: int
    bus_gbps: float  # nccl-tests bus bandwidth this group reaches (a node's links, or its share of the NICs)
    link: str = "nvlink"  # inside a node: nvlink | pci (NCCL's tables), gloo (CPU rings)
    compute_capability: float = 9.0  # NCCL keys LL caps and the ring plateau by GPU generation
    hop_us: float = 0.0  # gloo only: latency of one ring step

    @property
    def per_node(self) -> int:
        return max(1, self.ranks // self.nodes)


@dataclass(frozen=True)
class Choice:
    """What NCCL's tuner would pick for one call, and its predicted time."""

    seconds: float
    algorithm: str  # ring | tree
    protocol: str  # LL | LL128 | Simple | gloo


def _ll_cap(f: Fabric) -> float:
    if f.nodes == 1:
        return LL_MAX_ONE_NODE[8 if f.compute_capability >= 8 else 7]
    return LL_MAX_TWO_NODES if f.nodes == 2 else LL_MAX_MORE_NODES


def _ring_bus(f: Fabric, protocol: str, all_reduce: bool) -> float:
    if protocol == "LL":
        return min(_ll_cap(f), f.bus_gbps * (0.25 if f.nodes > 1 or all_reduce else 1 / 3))
    if protocol == "LL128":
        return f.bus_gbps * (0.7 if f.per_node < 2 else 0.92)
    return f.bus_gbps


def _ring_latency_us(f: Fabric, protocol: str, steps: int, inter_steps: int) -> float:
    intra = HOP_US[f.link]["ring"][protocol]
    if f.nodes > 1:
        intra = max(intra, NET_OVERHEAD_US * (3 if protocol == "Simple" else 1))
    inter_steps = min(inter_steps, steps)  # one rank per node: every step crosses the network
    return BASE_US["ring"][protocol] + (steps - inter_steps) * intra + inter_steps * HOP_US["net"]["ring"][protocol]


def _ring(payload: float, f: Fabric, protocol: str, steps: int, inter_steps: int, all_reduce: bool) -> float:
    if f.ranks <= 1:
        return 0.0
    if f.link == "gloo":
        return steps * f.hop_us * 1e-6 + payload * steps / f.ranks / (f.bus_gbps * 1e9)
    latency = _ring_latency_us(f, protocol, steps, inter_steps)
    if (all_reduce and protocol == "Simple" and f.nodes > 1
            and payload >= 64 * PLATEAU_CHANNELS * f.ranks):
        latency *= PLATEAU_PRE_AMPERE if f.compute_capability < 8 else PLATEAU
    return latency * 1e-6 + payload * steps / f.ranks / (_ring_bus(f, protocol, all_reduce) * 1e9)


def ring_all_gather(payload: float, f: Fabric, protocol: str = "Simple") -> float:
    """Seconds of a ring all-gather whose gathered output is `payload` bytes: n-1 steps."""
    return _ring(payload, f, protocol, f.ranks - 1, f.nodes - 1, all_reduce=False)


def ring_reduce_scatter(payload: float, f: Fabric, protocol: str = "Simple") -> float:
    """Seconds of a ring reduce-scatter of a `payload`-byte input: n-1 steps, as all-gather."""
    return _ring(payload, f, protocol, f.ranks - 1, f.nodes - 1, all_reduce=False)


def ring_all_reduce(payload: float, f: Fabric, protocol: str = "Simple") -> float:
    """Seconds of a ring all-reduce of `payload` bytes: 2(n-1) steps (reduce-scatter + all-gather)."""
    return _ring(payload, f, protocol, 2 * (f.ranks - 1), 2 * f.nodes if f.nodes > 1 else 0, all_reduce=True)


def tree_all_reduce(payload: float, f: Fabric, protocol: str = "Simple") -> float:
    """Seconds of NCCL's (double binary) tree all-reduce of `payload` bytes: a chain inside each
    node, a tree of depth log2(nodes) between them, up (reduce) then down (broadcast)."""
    if f.ranks <= 1:
        return 0.0
    if f.link == "gloo":
        raise ValueError("gloo has no tree all-reduce in this model: use ring_all_reduce")
    latency = BASE_US["tree"][protocol] + 2 * ((f.per_node - 1) * HOP_US[f.link]["tree"][protocol]
                                               + int(math.log2(f.nodes)) * HOP_US["net"]["tree"][protocol])
    bus = f.bus_gbps * TREE_BW
    if protocol == "LL":
        bus = min(bus / 3.8, _ll_cap(f))
    elif protocol == "LL128":
        bus *= 7 / 9 if f.nodes == 1 else 120 / 128
    table = TREE_CORRECTION[protocol]
    size_class = int(payload) >> 6
    index = size_class.bit_length() - 1 if size_class > 0 else 0
    if index < len(table):
        bus *= table[index]
    return latency * 1e-6 + 2 * payload / (bus * 1e9)  # algorithm bandwidth = 0.5 x bus


def _protocols(f: Fabric) -> tuple[str, ...]:
    if f.link == "gloo":
        return ("gloo",)
    return PROTOCOLS if f.link == "nvlink" else ("LL", "Simple")  # LL128: NVLink only


_ALGORITHMS: dict[str, tuple[tuple[str, Callable[[float, Fabric, str], float]], ...]] = {
    "all_gather": (("ring", ring_all_gather),),
    "reduce_scatter": (("ring", ring_reduce_scatter),),
    "all_reduce": (("ring", ring_all_reduce), ("tree", tree_all_reduce)),
}


def fastest(kind: str, payload: float, f: Fabric) -> Choice:
    """NCCL's choice for one `kind` call (all_gather | reduce_scatter | all_reduce) of `payload`
    bytes (the all-gather's output, the reduce-scatter's input, the all-reduce's buffer): the
    algorithm and protocol of least predicted time, as `ncclTopoGetAlgoTime` ranks them."""
    if kind not in _ALGORITHMS:
        raise ValueError(f"unknown collective {kind!r}: expected {', '.join(_ALGORITHMS)}")
    if f.ranks <= 1:
        return Choice(0.0, "ring", "Simple")
    options = [Choice(fn(payload, f, p), name, p) for name, fn in _ALGORITHMS[kind]
               if not (f.link == "gloo" and name == "tree") for p in _protocols(f)]
    return min(options, key=lambda c: c.seconds)
