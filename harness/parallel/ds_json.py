"""A DeepSpeed JSON config: find it, read what it implies, fill its "auto" fields.

One module because two callers must read the same file the same way: the
launcher side (`launchers.apply_launch_request` folds a file's stage,
precision and offload into `parallel.*`) and the backend (`zero.deepspeed_config`
builds what `deepspeed.initialize` gets). When each kept its own reader,
they disagreed on which "auto" values could be filled and on the default of
torch_autocast's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

#: torch_autocast dtype spellings DeepSpeed accepts, in harness terms.
AUTOCAST_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16"}
#: Elements per bucket for "auto" sizes: 200 MB of fp32; DeepSpeed's 5e8 default is sized for LLMs.
BUCKET_ELEMENTS = 50_000_000
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def resolve_path(path: str) -> Path:
    """A config path as the user meant it: absolute, relative to the working
    directory, or (so that `ds_configs/zero3_fp16.json` works from anywhere)
    relative to the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    in_repo = REPO_ROOT / p
    return in_repo.resolve() if in_repo.exists() else p


def read_deepspeed_json(path: str) -> dict[str, Any]:
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (looked in {Path.cwd()} and {REPO_ROOT}); "
                          f"the shipped ones are in ds_configs/")
    try:
        with open(resolved) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {resolved} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {resolved} must hold a JSON object")
    return data


def enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def deepspeed_json_fields(data: Mapping[str, Any], where: str = "DeepSpeed config") -> dict[str, Any]:
    """zero_stage, precision and cpu_offload that a DeepSpeed JSON implies."""
    zero = data.get("zero_optimization") or {}
    if isinstance(zero, bool):  # DeepSpeed's legacy `"zero_optimization": true` means stage 1
        zero = {"stage": 1 if zero else 0}
    stage = int(zero.get("stage", 0))
    bf16_mode = enabled(data.get("bf16")) or enabled(data.get("bfloat16"))
    if enabled(data.get("fp16")) and bf16_mode:
        raise ConfigError(f"{where} enables both fp16 and bf16")
    if enabled(data.get("fp16")):
        precision = "fp16"
    elif bf16_mode:
        precision = "bf16"
    elif enabled(data.get("torch_autocast")):
        dtype = str(data["torch_autocast"].get("dtype", "")).replace("torch.", "")
        precision = AUTOCAST_DTYPES.get(dtype)
        if precision is None:
            raise ConfigError(f"{where}: torch_autocast needs \"dtype\": \"bfloat16\" or \"float16\" (got {dtype!r})")
    else:
        precision = "fp32"
    offload = any(
        isinstance(zero.get(key), dict) and zero[key].get("device", "none") not in ("none", None)
        for key in ("offload_optimizer", "offload_param")
    )
    return {"zero_stage": stage, "precision": precision, "cpu_offload": offload}


def fill_auto(data: Mapping[str, Any], cfg: RunConfig, world_size: int, params: Optional[int] = None) -> dict[str, Any]:
    """A copy of the JSON with "auto" (or absent) batch and bucket fields filled from the run,
    ready for `deepspeed.initialize(config=...)`, which itself rejects "auto".

    Batch fields set to numbers must agree with the run. Buckets become BUCKET_ELEMENTS, or
    the model's parameter count (`params`) when smaller: DeepSpeed allocates a whole reduce
    bucket whatever the model's size, which would dwarf a small model's states. An "auto"
    anywhere else is refused by name."""
    out = json.loads(json.dumps(data))
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    fills = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
             "train_batch_size": micro * accum * world_size}
    for key, value in fills.items():
        if out.get(key, "auto") == "auto":
            out[key] = value
        elif int(out[key]) != value:
            raise ConfigError(f"deepspeed_config {key}={out[key]} disagrees with the run ({value} from "
                              "data.batch_size, train.grad_accum and the world size): set it to \"auto\"")
    if out.get("gradient_clipping") == "auto":
        out["gradient_clipping"] = 0.0
    zero = out.setdefault("zero_optimization", {})
    if isinstance(zero, dict):
        size = BUCKET_ELEMENTS if params is None else max(1, min(BUCKET_ELEMENTS, int(params)))
        for key in BUCKET_KEYS:
            if zero.get(key, "auto") == "auto":
                zero[key] = size
    left = list(_auto_keys(out))
    if left:
        raise ConfigError(f"DeepSpeed config has \"auto\" values the harness cannot fill: {', '.join(left)}")
    return out


def _auto_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def cpu_refusal(path: Optional[str], launcher: str = "none") -> Optional[str]:
    """Why the DeepSpeed JSON at `path` cannot train on a CPU, naming the file to use instead.

    DeepSpeed's CPU accelerator has no fp16 mode, and its ``fp16`` section
    casts the model to half. The shipped fp16 files have a bf16 twin
    (torch_autocast), which trains on CPUs and on A100/H100s alike; the way
    to name it depends on who chose the file, so the message says how for
    that launcher rather than asking to unset a setting the user never typed.
    """
    if not path or not enabled(read_deepspeed_json(path).get("fp16")):
        return None
    name = Path(path).name
    twin = resolve_path(path).with_name(name.replace("fp16", "bf16"))
    if "fp16" not in name or not twin.is_file():
        return (f"DeepSpeed config {path} uses DeepSpeed's fp16 mode, which CPUs cannot run: use a "
                "torch_autocast bf16 config (e.g. ds_configs/zero2_bf16.json) or train on CUDA GPUs")
    shown = str(Path(path).with_name(twin.name))
    how = {"accelerate": f"launch/accelerate/{name.split('_')[0]}_bf16.yaml, or add --deepspeed_config_file "
                         f"{shown} to accelerate launch",
           "deepspeed": f"--deepspeed_config {shown}"}.get(launcher, f"parallel.deepspeed_config={shown}")
    return f"DeepSpeed config {path} uses DeepSpeed's fp16 mode, which CPUs cannot run: on CPU use its bf16 twin ({how})"
