"""What can run where: the one rule set that training refuses by and the planner plans by.

Training checks a run against it at start-up (`check_supported`, called by
`pretrain` and `profile` before any run folder, loader or model exists);
the planner asks the same `refusal` for every strategy it would offer, so
`harness plan` never recommends what `harness pretrain` then refuses. Each
refusal is one line: what is wrong and what to set instead.

Two kinds of rule: the impossible (fairscale FSDP has no CPU path; a V100
has no bf16) and the pointless (fp16 on a CPU has no fast kernels and runs
11-13x slower than fp32: 5.8 vs 65 images/s on the quickstart). Engines
enforce only the impossible ones, so that tests can still drive the fp16
code paths (loss scaler, overflow skipping) on CPU; users can only get fp16
on a CPU by setting `parallel.allow_slow_cpu_fp16=true`.
"""

from __future__ import annotations

from typing import Optional

import torch

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig

FAIRSCALE_NEEDS_CUDA = ("parallel.backend=fairscale needs CUDA GPUs (fairscale FSDP has no CPU path); "
                        "use fsdp2 or deepspeed")
CPU_FP16 = ("parallel.precision=fp16 on CPU runs 11-13x slower than fp32 (CPUs have no fast fp16 kernels): "
            "use parallel.precision=fp32, or bf16 (CPU autocast supports it)")

#: Backends that have trained on one GPU only: the planner may offer them on several, marked.
UNVALIDATED_ON_SEVERAL_GPUS: dict[str, str] = {
    "fairscale": "fairscale has trained on one H100 only",
}


def refusal(backend: str, precision: str, device_type: str, bf16_supported: bool, *,
            device_name: str = "", allow_slow_cpu_fp16: bool = False) -> Optional[str]:
    """Why training refuses `backend` x `precision` on a `device_type` ("cpu" or "cuda")
    device, as one line naming the fix; None when it runs."""
    return backend_refusal(backend, device_type) or precision_refusal(
        precision, device_type, bf16_supported, device_name=device_name, allow_slow_cpu_fp16=allow_slow_cpu_fp16)


def backend_refusal(backend: str, device_type: str) -> Optional[str]:
    """Backends without a path on the device: checked first, before anything is built."""
    if backend == "fairscale" and device_type != "cuda":
        return FAIRSCALE_NEEDS_CUDA
    return None


def precision_refusal(precision: str, device_type: str, bf16_supported: bool, *, device_name: str = "",
                      allow_slow_cpu_fp16: bool = False) -> Optional[str]:
    """Numerics the device lacks (bf16 on a V100) or runs far slower than the alternatives (fp16 on CPU)."""
    if precision == "bf16" and not bf16_supported:
        return (f"parallel.precision=bf16 but {device_name or 'this device'} has no bf16 support "
                "(e.g. V100): use parallel.precision=fp16")
    if precision == "fp16" and device_type == "cpu" and not allow_slow_cpu_fp16:
        return CPU_FP16
    return None


def device_kind(device: torch.device) -> str:
    """"cuda" only where CUDA really is there: a cuda device on a machine without it is refused as a CPU."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return device.type


def has_bf16(device: torch.device) -> bool:
    """CPU autocast has bf16; on CUDA it is the card's (a V100 has none)."""
    return device.type != "cuda" or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device_kind(device) == "cuda" else device.type


def engine_precision_refusal(precision: str, device: torch.device) -> Optional[str]:
    """The impossible only: numerics an engine cannot run on `device` (fp16 on CPU it can, slowly)."""
    return precision_refusal(precision, device_kind(device), has_bf16(device), device_name=_device_label(device),
                             allow_slow_cpu_fp16=True)


def check_supported(cfg: RunConfig, device: torch.device) -> None:
    """Start-up check of a user's run: raises ConfigError with the one-line reason."""
    p = cfg.parallel
    reason = refusal(p.backend, p.precision, device_kind(device), has_bf16(device),
                     device_name=_device_label(device), allow_slow_cpu_fp16=p.allow_slow_cpu_fp16)
    if reason:
        raise ConfigError(reason)


def multi_gpu_caveat(backend: str, world_size: int) -> Optional[str]:
    """Why a strategy on `world_size` ranks is unproven (None: validated or a single rank)."""
    return UNVALIDATED_ON_SEVERAL_GPUS.get(backend) if world_size > 1 else None


def check_deepspeed_json(cfg: RunConfig, device_type: str, launcher: str = "none") -> None:
    """A DeepSpeed JSON that cannot run on this device, named with its replacement in the form
    the launcher that chose it takes. Checked first, before the preset's own advice (which
    would suggest a precision the JSON then contradicts)."""
    from harness.parallel.ds_json import cpu_refusal

    p = cfg.parallel
    if device_type == "cpu" and p.backend == "deepspeed":
        reason = cpu_refusal(p.deepspeed_config, launcher)
        if reason:
            raise ConfigError(reason)


def check_launch_supported(cfg: RunConfig, device_type: str) -> None:
    """`check_supported` at the command line's start-up (a run and its --dry-run alike),
    before any process group exists, for the device type the run would pick."""
    check_supported(cfg, torch.device(device_type))
