"""Device profiles: datasheet numbers, name lookup, calibration arithmetic, YAML profiles."""

from __future__ import annotations

import pytest
import yaml

from harness.profiling.devices import (CUDA_RESERVE_BYTES, GIB, MIB, DeviceProfile, device_to_dict, get_device,
                                       list_devices, load_device_yaml, supports)

BUILTIN = ["v100-32gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "cpu"]


def test_builtin_list() -> None:
    assert list_devices() == BUILTIN
    for key in BUILTIN:
        assert isinstance(get_device(key), DeviceProfile)


@pytest.mark.parametrize("alias, name", [
    ("V100", "V100-32GB"), ("v100-32GB", "V100-32GB"), ("Tesla V100-SXM2-32GB", "V100-32GB"),
    ("A100-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("a100_80gb", "A100-80GB"),
    ("H100", "H100-80GB"), ("NVIDIA H100 80GB HBM3", "H100-80GB"), ("h200", "H200-141GB"), ("CPU", "CPU"),
])
def test_aliases(alias: str, name: str) -> None:
    assert get_device(alias).name == name


def test_ambiguous_and_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"ambiguous.*a100-40gb, a100-80gb"):
        get_device("A100")
    with pytest.raises(ValueError, match=r"unknown device 'h1000'.*Did you mean 'h100-80gb'"):
        get_device("h1000")
    with pytest.raises(ValueError, match=r"Builtin devices: v100-32gb.*YAML"):
        get_device("tpu-v4")


def test_datasheet_numbers() -> None:
    v100, a100, h100, h200 = (get_device(k) for k in ("v100", "a100-80gb", "h100", "h200"))
    assert v100.peak_tflops == {"fp32": 15.7, "fp16": 125.0}
    assert not supports(v100, "bf16") and supports(v100, "fp16")
    assert a100.peak_tflops["bf16"] == a100.peak_tflops["fp16"] == 312.0
    assert h100.peak_tflops["bf16"] == h200.peak_tflops["bf16"] == 989.0
    assert [d.hbm_gbps for d in (v100, get_device("a100-40gb"), a100, h100, h200)] == [900, 1555, 2039, 3350, 4800]
    # allocatable = nvidia-smi total minus the CUDA context/NCCL reserve
    assert v100.memory_bytes == 32510 * MIB - CUDA_RESERVE_BYTES
    assert h200.memory_bytes == 143771 * MIB - CUDA_RESERVE_BYTES
    assert 30 * GIB < v100.memory_bytes < 32 * GIB < get_device("a100-40gb").memory_bytes < h100.memory_bytes
    for d in (v100, a100, h100):
        assert d.gpus_per_node == 8
        assert d.inter_node_gbps <= d.intra_node_gbps
        assert d.source


def test_calibration_arithmetic() -> None:
    """Recompute the V100 calibration from the published figures, independently of the module."""
    pycls_tflops = 1_281_167 * 100 / (76.0 * 3600) / 8 * 6 * 32.3e9 / 1e12  # RegNetY-32GF, fp32
    v100 = get_device("v100")
    assert v100.fp32_efficiency == pytest.approx(pycls_tflops / 15.7)
    assert v100.efficiency == pytest.approx(pycls_tflops * 2925 / 992 / 125)
    assert v100.efficiency == pytest.approx(0.2675, abs=1e-3)
    a100 = get_device("a100-40gb")
    assert a100.efficiency == pytest.approx(v100.efficiency * (5779 / 2925) / (312 / 125))
    h100 = get_device("h100")
    assert h100.efficiency == pytest.approx(a100.efficiency * (14.4 / 7.8) / (989 / 312))
    gemm_ceiling = 798 / 989  # measured bf16 matmul on an H100 (profiling/gpu_h100/measured.json)
    for key in BUILTIN[:-1]:
        d = get_device(key)
        assert 0 < d.efficiency < gemm_ceiling
        assert "pycls" in d.source or "V100" in d.source
    assert v100.efficiency_for("fp32") == v100.fp32_efficiency
    assert v100.efficiency_for("fp16") == v100.efficiency


def _write(tmp_path, data) -> str:
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


USER = {"name": "L40S", "memory_gib": 44, "peak_tflops": {"fp32": 183, "fp16": 362, "bf16": 362},
        "hbm_gbps": 864, "gpus_per_node": 4, "intra_node_gbps": 25, "inter_node_gbps": 12,
        "latency_us": 20, "efficiency": 0.15}


def test_yaml_round_trip_of_a_builtin(tmp_path) -> None:
    h100 = get_device("h100")
    path = _write(tmp_path, device_to_dict(h100))
    assert load_device_yaml(path) == h100
    assert get_device(path) == h100


def test_user_profile(tmp_path) -> None:
    dev = get_device(_write(tmp_path, USER))
    assert dev.name == "L40S" and dev.memory_bytes == 44 * GIB and dev.gpus_per_node == 4
    assert dev.fp32_efficiency is None and dev.efficiency_for("fp32") == 0.15
    assert "user profile" in dev.source
    assert load_device_yaml(_write(tmp_path, device_to_dict(dev))) == dev


@pytest.mark.parametrize("change, message", [
    ({"hbm_gbps": None}, r"missing key 'hbm_gbps'"),
    ({"hbm_gpbs": 864}, r"unknown key 'hbm_gpbs' \(did you mean 'hbm_gbps'\?\)"),
    ({"efficiency": 25}, r"efficiency must be at most 1.0, got 25"),
    ({"latency_us": -3}, r"latency_us must be a positive number, got -3"),
    ({"gpus_per_node": 2.5}, r"gpus_per_node must be a whole number"),
    ({"peak_tflops": {"fp8": 700}}, r"unknown precision 'fp8'; use fp32, fp16, bf16"),
    ({"peak_tflops": 362}, r"peak_tflops must be a mapping"),
    ({"memory_bytes": 10**9}, r"exactly one of memory_bytes or memory_gib"),
    ({"memory_gib": None}, r"exactly one of memory_bytes or memory_gib"),
    ({"name": ""}, r"name must be a non-empty string"),
])
def test_yaml_errors_name_the_key(tmp_path, change, message) -> None:
    data = {**USER, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        load_device_yaml(_write(tmp_path, data))


def test_yaml_file_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"not found: give a YAML file or one of v100-32gb"):
        get_device(str(tmp_path / "missing.yaml"))
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"expected a mapping of keys"):
        load_device_yaml(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"not valid YAML"):
        load_device_yaml(path)
