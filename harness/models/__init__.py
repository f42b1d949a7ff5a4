"""Trunks: the RegNet design space (SEER's quantization), named presets, feature taps."""

from harness.models.features import TAPS, extract_features
from harness.models.regnet import StageLayout, build_regnet, regnet_layout, validate_spec
from harness.models.zoo import (
    ModelInfo,
    build_trunk,
    build_trunk_from_config,
    count_gflops,
    describe,
    format_table,
    infos_to_json,
    list_models,
    preset_spec,
    trunk_out_dim,
)

__all__ = [
    "TAPS",
    "ModelInfo",
    "StageLayout",
    "build_regnet",
    "build_trunk",
    "build_trunk_from_config",
    "count_gflops",
    "describe",
    "extract_features",
    "format_table",
    "infos_to_json",
    "list_models",
    "preset_spec",
    "regnet_layout",
    "trunk_out_dim",
    "validate_spec",
]
