"""Device profiles for the capacity planner: what one GPU (and its node) offers.

A profile holds the datasheet numbers (memory, tensor-core peaks, HBM), the
interconnect as collectives see it (nccl-tests "bus bandwidth"), and one
calibrated number, `efficiency`: the fraction of the mixed-precision peak
that SEER-style RegNetY training reaches. Users describe other machines in a
YAML file (`load_device_yaml`; `get_device` takes a path as well as a name).

Calibration of `efficiency` (the SEER paper's own 6,125 ms step is NOT used:
it is what `profiling/time_model_check.py` checks the model against).

1. V100, fp32, measured on RegNetY: pycls MODEL_ZOO.md (facebookresearch/pycls)
   trains RegNetY-32GF (32.3 GMACs at 224 px, pycls "flops") for 100 ImageNet
   epochs (1,281,167 images each) in 76.0 h on 8 V100-SXM2-16GB. pycls had no
   mixed-precision option then (its config.py has no such key), so this is
   fp32: 128.1e6 / (76.0 h * 3600) / 8 = 58.5 img/s/GPU x 6 x 32.3e9 FLOP
   (fwd 2 FLOP per MAC, bwd 2x fwd) = 11.3 TFLOP/s = 0.72 of the 15.7 fp32 peak.
   The time includes data loading and a per-epoch evaluation (about 1% of
   the work), so this slightly understates the pure step rate.
2. V100, fp32 -> mixed precision: NVIDIA DeepLearningExamples, PyTorch
   SE-ResNeXt101-32x4d (grouped convolutions + squeeze-excitation, the
   closest published cousin of RegNetY), DGX-1 32GB, 8 GPUs: 992 img/s fp32,
   2925 img/s AMP, a 2.95x speedup. V100 AMP efficiency =
   11.3 x 2.95 / 125 = 0.267.
3. A100: the same README, DGX A100 80GB, 8 GPUs: 5779 img/s AMP, 1.98x the
   V100 for a 2.50x larger peak (312/125): efficiency 0.267 x 1.98 / 2.50 =
   0.212. TF32 there ran 2991 img/s (0.518 of AMP) on half the peak: fp32
   (TF32) efficiency 0.212 x 0.518 x 2 = 0.219.
4. H100: MLPerf Training v3.0 ResNet-50, two Dell submissions with 16 GPUs
   each: 7.8 min on H100-SXM5-80GB vs 14.4 min on A100-SXM-80GB (summarised
   at silvertonconsulting.com, 2023-07-12), 1.85x for a 3.17x larger peak:
   efficiency 0.212 x 1.85 / 3.17 = 0.123. Convolutional nets gain much less
   than the peak ratio because normalisation, activations and SE are memory-
   bound. The GEMM ceiling measured on a lent H100 (8192^3 bf16: 798 of 989
   TFLOP/s = 0.81, profiling/gpu_h100/measured.json) bounds any efficiency from above; these
   conv-net figures sit well below it.
5. H200: same compute as the H100 (the same matmul ran at 769-798 TFLOP/s)
   and 1.43x its HBM bandwidth. No published conv-net training figure was
   found, so it keeps the H100 efficiency: a conservative choice, since the
   memory-bound share of the step should run faster.

Interconnect: `inter_node_gbps` is the bus bandwidth of a collective whose
group spans whole nodes. A ring channel crosses each node boundary once, so
such collectives use every NIC of the node at once: nccl-tests issue 119 and
NCCL issue 1048 (8x A100 with 4x HDR) measure 85-96 GB/s against the
100 GB/s of all four NICs, i.e. about 0.9 of the node's aggregate NIC rate.
Groups holding one rank per node (HSDP replicas) get one NIC each, hence
`inter_node_gbps / gpus_per_node` (timing.py applies this). Latencies are
not a per-device number any more: collectives.py takes NCCL's own per-hop
latencies for the profile's `link` (nvlink, pci), keyed by the GPU's
`compute_capability` where NCCL's tuner is; `latency_us` is the latency of
one ring step only on `link: gloo` (the CPU profile).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

MIB = 1024**2
GIB = 1024**3

#: Subtracted from the card's total: CUDA context (~0.8 GB as soon as a
#: process touches the GPU, pytorch issue 34323) plus NCCL channel buffers
#: and cuBLAS/cuDNN workspaces (NCCL's memory is invisible to PyTorch's
#: allocator, PyTorch "Understanding CUDA Memory Usage"). Rough: 1 GiB.
CUDA_RESERVE_BYTES = 1 * GIB

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator and its node, as the time and memory models see it."""

    name: str
    memory_bytes: int  # what the framework can allocate (total minus CUDA_RESERVE_BYTES)
    peak_tflops: dict[str, float]  # dense tensor-core peak; a precision absent is unsupported
    hbm_gbps: float
    gpus_per_node: int
    intra_node_gbps: float  # bus bandwidth of ring collectives inside a node
    inter_node_gbps: float  # bus bandwidth of collectives spanning whole nodes
    latency_us: float  # gloo ring step latency (link "gloo"); NCCL links use collectives.py's tables
    efficiency: float  # achieved fraction of the mixed-precision peak (calibrated)
    source: str
    fp32_efficiency: Optional[float] = None  # fraction of the fp32 peak; None: same as `efficiency`
    host_gbps: float = 25.0  # host-memory bandwidth one GPU's CPU optimizer gets (cpu_offload)
    pcie_gbps: float = 20.0  # host<->device copies (cpu_offload)
    op_us: float = 0.0  # host time per dispatched forward/backward op: a floor under compute (0: none)
    optimizer_op_us: float = 0.0  # the same for the optimizer's per-tensor ops
    link: str = "nvlink"  # what connects a node's GPUs for NCCL: nvlink | pci; gloo: CPU ranks
    compute_capability: float = 8.0  # NCCL's tuner keys LL caps and the ring plateau by it

    def efficiency_for(self, precision: str) -> float:
        """`efficiency` for fp16/bf16; fp32 runs on other units (V100: CUDA cores)."""
        if precision == "fp32" and self.fp32_efficiency is not None:
            return self.fp32_efficiency
        return self.efficiency


def supports(device: DeviceProfile, precision: str) -> bool:
    """Whether the device has a peak for `precision` (V100: no bf16)."""
    return precision in device.peak_tflops


def device_type(device: DeviceProfile) -> str:
    """"cpu" for the CPU profile, "cuda" for every GPU one: what training's refusals are keyed by."""
    return "cpu" if device.name == _BUILTIN["cpu"].name else "cuda"


# ------------------------------------------------------------ calibration

_IMAGENET_TRAIN = 1_281_167
# pycls MODEL_ZOO.md, RegNetY-32GF row: 32.3 GMACs, 76.0 h for 100 epochs on 8 V100 (fp32).
_PYCLS_MACS, _PYCLS_HOURS, _PYCLS_GPUS, _PYCLS_EPOCHS = 32.3e9, 76.0, 8, 100
_V100_FP32_PEAK, _V100_FP16_PEAK = 15.7, 125.0
# DeepLearningExamples SE-ResNeXt101-32x4d (PyTorch), 8 GPUs, img/s.
_DLE_V100_FP32, _DLE_V100_AMP = 992.0, 2925.0  # DGX-1 32GB
_DLE_A100_TF32, _DLE_A100_AMP = 2991.0, 5779.0  # DGX A100 80GB
# MLPerf Training v3.0 ResNet-50, 16 GPUs (Dell): minutes to train.
_MLPERF_A100_MIN, _MLPERF_H100_MIN = 14.4, 7.8
_A100_PEAK, _A100_TF32_PEAK, _H100_PEAK, _H100_TF32_PEAK = 312.0, 156.0, 989.0, 494.5


def _pycls_fp32_tflops() -> float:
    images_per_gpu_s = _IMAGENET_TRAIN * _PYCLS_EPOCHS / (_PYCLS_HOURS * 3600) / _PYCLS_GPUS
    return images_per_gpu_s * 3 * 2 * _PYCLS_MACS / 1e12


V100_FP32_EFFICIENCY = _pycls_fp32_tflops() / _V100_FP32_PEAK
V100_EFFICIENCY = _pycls_fp32_tflops() * (_DLE_V100_AMP / _DLE_V100_FP32) / _V100_FP16_PEAK
A100_EFFICIENCY = V100_EFFICIENCY * (_DLE_A100_AMP / _DLE_V100_AMP) / (_A100_PEAK / _V100_FP16_PEAK)
_TF32_OVER_AMP = _DLE_A100_TF32 / _DLE_A100_AMP  # throughput ratio on A100
A100_FP32_EFFICIENCY = A100_EFFICIENCY * _TF32_OVER_AMP * (_A100_PEAK / _A100_TF32_PEAK)
H100_EFFICIENCY = A100_EFFICIENCY * (_MLPERF_A100_MIN / _MLPERF_H100_MIN) / (_H100_PEAK / _A100_PEAK)
H100_FP32_EFFICIENCY = H100_EFFICIENCY * _TF32_OVER_AMP * (_H100_PEAK / _H100_TF32_PEAK)

_CALIBRATION = (
    f"efficiency: pycls MODEL_ZOO.md RegNetY-32GF fp32 on 8 V100 (76.0 h / 100 epochs -> "
    f"{_pycls_fp32_tflops():.2f} TFLOP/s = {V100_FP32_EFFICIENCY:.3f} of 15.7) x AMP/fp32 "
    f"{_DLE_V100_AMP / _DLE_V100_FP32:.2f} (DeepLearningExamples SE-ResNeXt101-32x4d, DGX-1 32GB, "
    f"2925/992 img/s) / 125 = {V100_EFFICIENCY:.3f}"
)

# Host time per dispatched op, MEASURED on a lent H100's host (torch 2.11 eager, fp16 autocast,
# `profiling/gpu_prediction_check.py`): RegNetY-8GF at SEER settings, 1 GPU, DDP, no checkpointing,
# forward 42 ms for 1,344 ops and optimizer 48 ms for 3,899 ops (op counts: the same step dispatched
# on CPU). Small RegNets are launch-bound there (forward of 8GF and 32GF: 42 vs 49 ms for 4x the
# FLOPs). A property of the host and of eager PyTorch, so carried over to every GPU profile.
GPU_OP_US, GPU_OPTIMIZER_OP_US = 31.0, 12.3
_HOST_NOTE = (f"host overhead {GPU_OP_US:.0f} us per forward/backward op and {GPU_OPTIMIZER_OP_US} us per "
              f"optimizer op, measured on a lent H100 (devices.py, GPU_OP_US)")

_NCCL_NOTE = ("NCCL bus bandwidths: NVLink4 ring ~370 GB/s (nccl-tests issue 212, sjeaugey); NDR NIC "
              "46-48 GB/s (nccl-tests issue 290); HDR NIC ~24 GB/s and 2-node ring 86 of 96 GB/s "
              "(NCCL issue 1048); 8x A100 single node 232 GB/s (NCCL issue 1048); DGX-1 4x EDR "
              "multi-node all-reduce ~40 GB/s (NCCL GTC 2017 S7155, cited in nccl-tests issue 29)")


def _mib(n: int) -> int:
    return n * MIB - CUDA_RESERVE_BYTES


CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
CPU_CORE_GFLOPS = 64.0
CPU_EFFICIENCY = 0.1

_BUILTIN: dict[str, DeviceProfile] = {
    "v100-32gb": DeviceProfile(
        name="V100-32GB", memory_bytes=_mib(32510),
        peak_tflops={"fp32": 15.7, "fp16": 125.0}, hbm_gbps=900.0, gpus_per_node=8,
        intra_node_gbps=120.0, inter_node_gbps=40.0, latency_us=15.0, compute_capability=7.0,
        efficiency=V100_EFFICIENCY, fp32_efficiency=V100_FP32_EFFICIENCY,
        host_gbps=15.0, pcie_gbps=12.0,
        op_us=GPU_OP_US, optimizer_op_us=GPU_OPTIMIZER_OP_US,
        source=(f"V100-SXM2 datasheet (15.7 fp32 / 125 fp16 TFLOPS, 900 GB/s, no bf16); 32510 MiB "
                f"(nvidia-smi) - 1 GiB reserve; DGX-1-class node, SEER's kind: 8 GPUs, NVLink2 6x25 GB/s "
                f"per direction at ~0.8 ring efficiency -> 120 GB/s (assumed), 4x EDR 100 Gb/s -> 40 GB/s "
                f"measured multi-node all-reduce; {_CALIBRATION}; fp32_efficiency {V100_FP32_EFFICIENCY:.3f} "
                f"is the pycls figure itself (no TF32 on V100); {_NCCL_NOTE}; {_HOST_NOTE}; host/PCIe (Gen3) rough")),
    "a100-40gb": DeviceProfile(
        name="A100-40GB", memory_bytes=_mib(40536),
        peak_tflops={"fp32": 156.0, "fp16": 312.0, "bf16": 312.0}, hbm_gbps=1555.0, gpus_per_node=8,
        intra_node_gbps=230.0, inter_node_gbps=170.0, latency_us=12.0,
        efficiency=A100_EFFICIENCY, fp32_efficiency=A100_FP32_EFFICIENCY,
        op_us=GPU_OP_US, optimizer_op_us=GPU_OPTIMIZER_OP_US,
        source=(f"A100-SXM4 datasheet (fp32 entry = TF32 tensor cores, which PyTorch uses for convolutions "
                f"by default; 312 fp16/bf16; 1555 GB/s); 40536 MiB (nvidia-smi) - 1 GiB; DGX A100 node: "
                f"NVSwitch ~230 GB/s measured, 8x HDR 200 Gb/s: 8 x 24 GB/s x 0.9 ~ 170 GB/s; "
                f"V100 {_CALIBRATION}; A100 carry-over: x {_DLE_A100_AMP / _DLE_V100_AMP:.2f} measured "
                f"A100/V100 AMP throughput (DeepLearningExamples SE-ResNeXt101-32x4d, 5779/2925 img/s) / "
                f"2.50 peak ratio = {A100_EFFICIENCY:.3f} (measured on the 80GB part: its faster HBM is "
                f"not separated out); TF32 {A100_FP32_EFFICIENCY:.3f} from 2991 img/s TF32; {_NCCL_NOTE}; {_HOST_NOTE}")),
    "a100-80gb": DeviceProfile(
        name="A100-80GB", memory_bytes=_mib(81920),
        peak_tflops={"fp32": 156.0, "fp16": 312.0, "bf16": 312.0}, hbm_gbps=2039.0, gpus_per_node=8,
        intra_node_gbps=230.0, inter_node_gbps=170.0, latency_us=12.0,
        efficiency=A100_EFFICIENCY, fp32_efficiency=A100_FP32_EFFICIENCY,
        op_us=GPU_OP_US, optimizer_op_us=GPU_OPTIMIZER_OP_US,
        source=(f"A100-SXM4-80GB datasheet (fp32 = TF32; 312 fp16/bf16; 2039 GB/s); 81920 MiB (nvidia-smi) "
                f"- 1 GiB; DGX A100 node as a100-40gb; efficiency {A100_EFFICIENCY:.3f} carried over from "
                f"V100 via DeepLearningExamples DGX A100 80GB vs DGX-1 (see module docstring); {_NCCL_NOTE}; {_HOST_NOTE}")),
    "h100-80gb": DeviceProfile(
        name="H100-80GB", memory_bytes=_mib(81559),
        peak_tflops={"fp32": 494.5, "fp16": 989.0, "bf16": 989.0}, hbm_gbps=3350.0, gpus_per_node=8,
        intra_node_gbps=370.0, inter_node_gbps=340.0, latency_us=10.0, compute_capability=9.0,
        efficiency=H100_EFFICIENCY, fp32_efficiency=H100_FP32_EFFICIENCY, host_gbps=30.0, pcie_gbps=40.0,
        op_us=GPU_OP_US, optimizer_op_us=GPU_OPTIMIZER_OP_US,
        source=(f"H100-SXM5 datasheet (dense: TF32 494.5, fp16/bf16 989; 3.35 TB/s); 81559 MiB seen by "
                f"nvidia-smi on a lent H100 - 1 GiB; DGX H100 node: NVLink4 ring ~370 GB/s, 8x NDR 400 Gb/s: "
                f"8 x 47 GB/s x 0.9 ~ 340 GB/s; efficiency {H100_EFFICIENCY:.3f} = A100 (itself carried over from the "
                f"V100 pycls calibration, see module docstring) x 1.85 (MLPerf "
                f"Training v3.0 ResNet-50, Dell 16x A100 14.4 min vs 16x H100 7.8 min) / 3.17 peak ratio; "
                f"GEMM ceiling 798/989 = 0.81 measured (profiling/gpu_h100/measured.json) bounds it; TF32 efficiency assumes "
                f"the A100's TF32/AMP throughput ratio; {_NCCL_NOTE}; {_HOST_NOTE}")),
    "h200-141gb": DeviceProfile(
        name="H200-141GB", memory_bytes=_mib(143771),
        peak_tflops={"fp32": 494.5, "fp16": 989.0, "bf16": 989.0}, hbm_gbps=4800.0, gpus_per_node=8,
        intra_node_gbps=370.0, inter_node_gbps=340.0, latency_us=10.0, compute_capability=9.0,
        efficiency=H100_EFFICIENCY, fp32_efficiency=H100_FP32_EFFICIENCY, host_gbps=30.0, pcie_gbps=40.0,
        op_us=GPU_OP_US, optimizer_op_us=GPU_OPTIMIZER_OP_US,
        source=(f"H200 datasheet (H100 compute, 141 GB HBM3e at 4.8 TB/s); 143771 MiB seen by nvidia-smi on "
                f"a lent H200 - 1 GiB; DGX H200 node (NVLink4, 8x NDR 400 Gb/s) as h100-80gb; efficiency = "
                f"H100's {H100_EFFICIENCY:.3f} (V100 pycls calibration carried over via A100 and H100; same "
                f"matmul rate measured, 769-798 TFLOP/s; no published conv-net training figure found, "
                f"conservative since HBM is 1.43x faster); {_NCCL_NOTE}; {_HOST_NOTE}")),
    "cpu": DeviceProfile(
        name="CPU", memory_bytes=int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if hasattr(os, "sysconf") else 16 * GIB,
        peak_tflops={"fp32": CPU_CORES * CPU_CORE_GFLOPS / 1e3, "bf16": CPU_CORES * CPU_CORE_GFLOPS / 1e3,
                     "fp16": CPU_CORES * CPU_CORE_GFLOPS / 2e3},
        hbm_gbps=20.0, gpus_per_node=1, intra_node_gbps=5.0, inter_node_gbps=1.2, latency_us=100.0, link="gloo",
        efficiency=CPU_EFFICIENCY, host_gbps=20.0, pcie_gbps=20.0,
        source=(f"this host: {CPU_CORES} usable cores x {CPU_CORE_GFLOPS:.0f} GFLOP/s (AVX-512 FMA, "
                f"2 GHz x 32 fp32 FLOP/cycle); all RAM. Efficiency {CPU_EFFICIENCY} MEASURED on this "
                "project's 2-core CI host: the quickstart step (10.19 GFLOP, RegNetY-200MF, 32 images, "
                "2x64 + 4x32 crops) took 0.81 s, 12.6 GFLOP/s of 128 (`harness profile -c quickstart`). "
                "gloo ranks share the cores: per-rank speed falls with more ranks per host")),
}

_STRIP = re.compile(r"\b(nvidia|tesla|sxm\d?|hbm\d?e?)\b")  # PCIe parts are other devices: not stripped


def list_devices() -> list[str]:
    """Builtin profile keys, oldest GPU first, then "cpu"."""
    return list(_BUILTIN)


def _canonical(name: str) -> str:
    """'NVIDIA A100-SXM4-40GB' -> 'a100-40gb'; 'H100 80GB HBM3' -> 'h100-80gb'."""
    words = _STRIP.sub(" ", name.lower().replace("_", " ").replace("-", " "))
    return "-".join(words.split())


def profile_key(device: DeviceProfile) -> str:
    """The profile's file-name key: 'H100-80GB' -> 'h100-80gb' (measurement files are named by it)."""
    return _canonical(device.name)


def _lookup(name: str) -> Optional[DeviceProfile]:
    key = _canonical(name)
    if key in _BUILTIN:
        return _BUILTIN[key]
    family = [k for k in _BUILTIN if k.split("-")[0] == key]
    if len(family) == 1:
        return _BUILTIN[family[0]]
    if len(family) > 1:
        raise ValueError(f"device {name!r} is ambiguous: say which of {', '.join(family)}")
    return None


def get_device(name_or_path: Union[str, Path]) -> DeviceProfile:
    """A builtin profile by name (case-insensitive; "V100", "A100-40GB", "h100" ...)
    or a user profile from a YAML file path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return load_device_yaml(path)
    found = _lookup(text)
    if found is not None:
        return found
    close = difflib.get_close_matches(_canonical(text), list(_BUILTIN), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown device {text!r}.{hint} Builtin devices: {', '.join(list_devices())}; "
                     "or pass the path of a YAML profile (keys: " + ", ".join(_KEYS) + ")")


# ------------------------------------------------------------------- YAML

_REQUIRED = ("name", "peak_tflops", "hbm_gbps", "gpus_per_node", "intra_node_gbps",
             "inter_node_gbps", "latency_us", "efficiency")
_OPTIONAL = ("source", "fp32_efficiency", "host_gbps", "pcie_gbps", "op_us", "optimizer_op_us", "link",
             "compute_capability")
LINKS = ("nvlink", "pci", "gloo")
_MEMORY_KEYS = ("memory_bytes", "memory_gib")
_KEYS = _REQUIRED + _MEMORY_KEYS + _OPTIONAL


def _number(data: dict[str, Any], key: str, where: str, *, integer: bool = False,
            at_most: Optional[float] = None) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{where}: {key} must be a whole number, got {value!r}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{where}: {key} must be at most {at_most}, got {value!r} "
                         "(a fraction of the peak, e.g. 0.25)")
    return int(value) if integer else float(value)


def _peaks(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: peak_tflops must be a mapping of precision to dense TFLOP/s, "
                         "e.g. {fp32: 156, fp16: 312, bf16: 312}")
    unknown = [k for k in value if k not in PRECISIONS]
    if unknown:
        raise ValueError(f"{where}: peak_tflops has unknown precision {unknown[0]!r}; "
                         f"use {', '.join(PRECISIONS)} (leave out the ones the device lacks)")
    return {k: _number(value, k, f"{where}: peak_tflops") for k in value}


def device_from_dict(data: dict[str, Any], where: str = "device profile") -> DeviceProfile:
    """Validate a mapping (as read from YAML) into a DeviceProfile; errors say how to fix."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys ({', '.join(_KEYS)}), got {type(data).__name__}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown key {unknown[0]!r}{hint}; valid keys: {', '.join(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}; a profile needs {', '.join(_REQUIRED)} "
                         "and one of memory_bytes / memory_gib")
    given = [k for k in _MEMORY_KEYS if k in data]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of memory_bytes or memory_gib "
                         f"(allocatable device memory), got {given or 'neither'}")
    memory = (_number(data, "memory_bytes", where, integer=True) if given[0] == "memory_bytes"
              else int(_number(data, "memory_gib", where) * GIB))
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ValueError(f"{where}: name must be a non-empty string, e.g. 'A100-40GB'")
    optional: dict[str, Any] = {}
    for key in ("host_gbps", "pcie_gbps", "op_us", "optimizer_op_us"):
        if key in data:
            optional[key] = _number(data, key, where)
    if data.get("fp32_efficiency") is not None:
        optional["fp32_efficiency"] = _number(data, "fp32_efficiency", where, at_most=1.0)
    if "compute_capability" in data:
        optional["compute_capability"] = _number(data, "compute_capability", where)
    if "link" in data:
        if data["link"] not in LINKS:
            raise ValueError(f"{where}: link must be one of {', '.join(LINKS)} (what connects a node's GPUs: "
                             f"nvlink, pci; gloo for CPU ranks), got {data['link']!r}")
        optional["link"] = data["link"]
    return DeviceProfile(
        name=data["name"].strip(), memory_bytes=memory, peak_tflops=_peaks(data["peak_tflops"], where),
        hbm_gbps=_number(data, "hbm_gbps", where),
        gpus_per_node=_number(data, "gpus_per_node", where, integer=True),
        intra_node_gbps=_number(data, "intra_node_gbps", where),
        inter_node_gbps=_number(data, "inter_node_gbps", where),
        latency_us=_number(data, "latency_us", where),
        efficiency=_number(data, "efficiency", where, at_most=1.0),
        source=str(data.get("source") or f"user profile {where}"), **optional)


def load_device_yaml(path: Union[str, Path]) -> DeviceProfile:
    """A user-defined profile from YAML (keys as DeviceProfile's fields;
    memory as memory_bytes or memory_gib)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"device profile {str(path)!r} not found: give a YAML file or one of "
                         f"{', '.join(list_devices())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    return device_from_dict(data, str(path))


def device_to_dict(device: DeviceProfile) -> dict[str, Any]:
    """The YAML-ready mapping of a profile (`load_device_yaml` reads it back)."""
    out = {f.name: getattr(device, f.name) for f in fields(device)}
    out["peak_tflops"] = dict(device.peak_tflops)
    if out["fp32_efficiency"] is None:
        del out["fp32_efficiency"]
    for key in ("op_us", "optimizer_op_us"):  # 0 = no floor, the default when absent
        if not out[key]:
            del out[key]
    return out
