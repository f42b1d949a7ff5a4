"""What started this process, and which backend that launcher asked for.

A run's `parallel` section is the single source of truth, but users also
express intent through the launcher: `accelerate launch --config_file
zero3.yaml`, `deepspeed --deepspeed_config zero3_fp16.json`, `torchrun`. If
the harness ignored that, a ZeRO-3 launch would quietly train with DDP.
So `detect_launch` turns the launcher's environment and argv into a
`LaunchRequest`, and `apply_launch_request` folds it into the config:
the launcher wins over preset values, and contradicts a value the user set
on the command line only with a `ConfigError` that names both.

Channels, measured on a 2-core CPU machine with accelerate 1.15, deepspeed
0.19.8 and torch 2.14 (launch/accelerate/*.yaml, 2 processes each):

* every `accelerate launch` child gets ACCELERATE_MIXED_PRECISION ("no",
  "fp16", "bf16"; "no" is also what a YAML without the key gives, so it is
  read as "no opinion"). The DDP and FSDP paths add ACCELERATE_DYNAMO_*; the
  multi-process paths run under torchrun, so TORCHELASTIC_*, RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK are set as well.
* ddp.yaml (MULTI_GPU): nothing else; DDP is implied by WORLD_SIZE > 1.
* fsdp2.yaml: ACCELERATE_USE_FSDP=true, FSDP_VERSION=2,
  FSDP_RESHARD_AFTER_FORWARD=true|false, FSDP_OFFLOAD_PARAMS,
  FSDP_ACTIVATION_CHECKPOINTING, FSDP_SHARDING_STRATEGY (FULL_SHARD even
  for version 2), FSDP_AUTO_WRAP_POLICY, FSDP_MIN_NUM_PARAMS, ...
* zero2.yaml / zero3.yaml: ACCELERATE_USE_DEEPSPEED=true,
  ACCELERATE_DEEPSPEED_CONFIG_FILE (as written in the YAML, relative to the
  launch directory), ACCELERATE_DEEPSPEED_ZERO3_INIT, ACCELERATE_CONFIG_DS_FIELDS.
  No ZERO_STAGE variable: with a config file the stage lives only in the
  JSON (Accelerate refuses zero_stage/mixed_precision next to it), so we
  read the JSON. ACCELERATE_DEEPSPEED_ZERO_STAGE and *_OFFLOAD_*_DEVICE
  appear only for YAMLs that configure DeepSpeed inline.

The CPU fallback is not in these variables, which the launcher exports
unchanged: it is in Accelerate's runtime. `Accelerator()` reports
DistributedType.NO under fsdp2.yaml on CPU, and under zero*.yaml it fails
without the `transformers` package. Hence: read the environment, never
`accelerator.distributed_type`. The one launch that drops the variables
is `accelerate launch --cpu` (one process, only ACCELERATE_USE_CPU=True); there
we read `--config_file` from the parent's command line (/proc/PPID/cmdline,
which is the `accelerate launch` process on every path we tried) and parse
that YAML instead.

`deepspeed --num_gpus 2 --module harness.pretrain --deepspeed_config X.json`
works on this GPU-less machine as is (DeepSpeed picks its CPU accelerator;
DS_ACCELERATOR=cpu only silences the warning). `--include localhost:0,1`
fails ("No slot '1'"), `--bind_cores_to_rank` needs numactl. Children get
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, CROSS_RANK, CROSS_SIZE,
LOCAL_SIZE (the last three are DeepSpeed's own), CUDA_VISIBLE_DEVICES, and
argv `--local_rank=N --deepspeed_config X.json ...`: `split_launcher_args`
removes those before the harness CLI parses the rest.

torchrun: TORCHELASTIC_RUN_ID and friends plus the usual rank variables;
it asks for no backend, so the config decides (DDP when it says "none"
but several processes were started).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from harness.config.loader import ConfigError
from harness.config.schema import ParallelConfig, RunConfig
from harness.parallel.ds_json import deepspeed_json_fields, read_deepspeed_json, resolve_path

log = logging.getLogger(__name__)

# Flags that launchers add to our argv (the first two take a value).
_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")
_DS_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")
_DS_BARE_FLAGS = ("--deepspeed",)  # deepspeed.add_config_arguments' on/off switch
# Set by every `accelerate launch` path; a stray ACCELERATE_LOG_LEVEL in the shell must not count.
_ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP",
                       "ACCELERATE_USE_CPU")


@dataclass
class LaunchRequest:
    """What the launcher asked for; None means "no opinion, keep the config"."""

    launcher: str = "none"  # accelerate | deepspeed | torchrun | none
    backend: Optional[str] = None  # a parallel.backend value
    zero_stage: Optional[int] = None
    precision: Optional[str] = None  # fp32 | fp16 | bf16 (fp8 is refused later)
    deepspeed_config: Optional[str] = None
    reshard_after_forward: Optional[bool] = None
    cpu_offload: Optional[bool] = None
    activation_checkpointing: Optional[bool] = None
    fsdp_version: Optional[int] = None  # Accelerate's FSDP_VERSION; only 2 is supported
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    source: str = "env"  # env | argv | parent-argv: which channel carried the request
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """For messages: e.g. "accelerate launch (DeepSpeed ZeRO-3, ds_configs/zero3_fp16.json)"."""
        who = {"accelerate": "accelerate launch", "deepspeed": "the deepspeed launcher",
               "torchrun": "torchrun"}.get(self.launcher, "this launch")
        what = {"deepspeed": "DeepSpeed" + (f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""),
                "fsdp2": "FSDP", "ddp": "DDP"}.get(self.backend or "", "")
        details = [d for d in (what, self.deepspeed_config, None if self.source == "env" else f"via {self.source}") if d]
        return f"{who} ({', '.join(details)})" if details else who

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def parallel_fields(self) -> dict[str, Any]:
        """The requested `parallel.*` values (only those the launcher stated)."""
        names = ("backend", "zero_stage", "precision", "deepspeed_config", "reshard_after_forward",
                 "cpu_offload", "activation_checkpointing")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


# ---------------------------------------------------------------- argv


def split_launcher_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Remove launcher-injected flags from `argv` (without the program name).

    Handles `--local_rank N`, `--local_rank=N`, `--local-rank[=]N` (deepspeed,
    torch.distributed.launch), `--deepspeed_config[=]PATH` and the bare
    `--deepspeed` switch. Returns the rest in order and
    {"local_rank": int, "deepspeed_config": str, "deepspeed": True} for what
    was found.
    """
    rest: list[str] = []
    extra: dict[str, Any] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        name, eq, inline = arg.partition("=")
        if name in _LOCAL_RANK_FLAGS or name in _DS_CONFIG_FLAGS:
            if eq:
                value = inline
            elif i + 1 < len(items):
                value = items[i + 1]
                i += 1
            else:
                raise ConfigError(f"{name} needs a value (launchers pass e.g. {name}=0)")
            if name in _LOCAL_RANK_FLAGS:
                try:
                    extra["local_rank"] = int(value)
                except ValueError:
                    raise ConfigError(f"{name}={value!r} is not an integer") from None
            else:
                extra["deepspeed_config"] = value
        elif arg in _DS_BARE_FLAGS:
            extra["deepspeed"] = True
        else:
            rest.append(arg)
        i += 1
    return rest, extra


# ---------------------------------------------------------------- environment


def _flag(value: Optional[str]) -> Optional[bool]:
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def _int(environ: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if environ.get(name, "").strip().lstrip("-").isdigit():
            return int(environ[name])
    return default


def _precision(accelerate_value: Optional[str]) -> Optional[str]:
    """Accelerate's mixed_precision -> ours; "no" (also the unset default) -> no opinion."""
    if accelerate_value is None or accelerate_value.lower() in ("no", "none", ""):
        return None
    return accelerate_value.lower()


def _reshard(value: Optional[str]) -> Optional[bool]:
    """FSDP_RESHARD_AFTER_FORWARD: a bool for FSDP2, a sharding strategy for FSDP1."""
    if value is None:
        return None
    v = value.strip().upper()
    if v in ("TRUE", "1", "FULL_SHARD", "HYBRID_SHARD"):
        return True
    if v in ("FALSE", "0", "SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2", "NO_SHARD"):
        return False
    return None


def _apply_deepspeed_file(req: LaunchRequest, path: Optional[str]) -> None:
    """Stage/precision/offload from the JSON, when it can be read here.
    A missing file is reported by `apply_launch_request`, not here, so that
    detection itself never fails."""
    req.deepspeed_config = path
    if not path:
        return
    try:
        fields = deepspeed_json_fields(read_deepspeed_json(path), f"DeepSpeed config {path}")
    except ConfigError as err:
        req.notes.append(str(err))
        return
    req.zero_stage, req.precision, req.cpu_offload = fields["zero_stage"], fields["precision"], fields["cpu_offload"]


def _from_accelerate_env(req: LaunchRequest, env: Mapping[str, str]) -> bool:
    """Fill `req` from ACCELERATE_*/FSDP_* variables; False if they name no backend."""
    req.precision = _precision(env.get("ACCELERATE_MIXED_PRECISION"))
    if _flag(env.get("ACCELERATE_USE_DEEPSPEED")):
        req.backend = "deepspeed"
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            req.zero_stage = _int(env, "ACCELERATE_DEEPSPEED_ZERO_STAGE", default=-1)
        devices = (env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                   env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"))
        if any(d and d.lower() not in ("none", "") for d in devices):
            req.cpu_offload = True
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") not in (None, "", "none"):
            _apply_deepspeed_file(req, env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        return True
    if _flag(env.get("ACCELERATE_USE_FSDP")):
        req.backend = "fsdp2"
        req.fsdp_version = _int(env, "FSDP_VERSION", default=1)
        req.reshard_after_forward = _reshard(env.get("FSDP_RESHARD_AFTER_FORWARD"))
        req.cpu_offload = True if _flag(env.get("FSDP_OFFLOAD_PARAMS")) else None
        req.activation_checkpointing = True if _flag(env.get("FSDP_ACTIVATION_CHECKPOINTING")) else None
        return True
    return False


def _from_accelerate_yaml(req: LaunchRequest, data: Mapping[str, Any]) -> None:
    """The same request from an Accelerate YAML (the `--cpu` fallback)."""
    kind = str(data.get("distributed_type", "NO")).upper()
    mp = data.get("mixed_precision")
    req.precision = _precision(None if mp is None else str(mp))
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        req.backend = "deepspeed"
        if ds.get("zero_stage") is not None:
            req.zero_stage = int(ds["zero_stage"])
        if any(str(ds.get(k, "none")).lower() != "none" for k in ("offload_optimizer_device", "offload_param_device")):
            req.cpu_offload = True
        if ds.get("deepspeed_config_file"):
            _apply_deepspeed_file(req, str(ds["deepspeed_config_file"]))
    elif kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        req.backend = "fsdp2"
        req.fsdp_version = int(fsdp.get("fsdp_version", 1))
        raw = fsdp.get("fsdp_reshard_after_forward")
        req.reshard_after_forward = None if raw is None else _reshard(str(raw))
        req.cpu_offload = True if fsdp.get("fsdp_offload_params") else None
        req.activation_checkpointing = True if fsdp.get("fsdp_activation_checkpointing") else None
    elif kind.startswith("MULTI_"):
        req.backend = "ddp"


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _option(argv: Sequence[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def detect_launch(
    environ: Mapping[str, str] = os.environ,
    argv: Sequence[str] = sys.argv,
    parent_argv: Optional[Sequence[str]] = None,
) -> LaunchRequest:
    """Which launcher started us and what it asked for (never raises on odd input).

    `argv` is scanned for `--deepspeed_config`/`--local_rank`, so pass the
    unstripped sys.argv. `parent_argv` is read from /proc only when needed
    (`accelerate launch --cpu`); tests pass it explicitly.
    """
    env = environ
    try:
        _, extra = split_launcher_args(argv)
    except ConfigError:  # a dangling flag: pretrain's own parsing will report it
        extra = {}
    req = LaunchRequest(
        world_size=_int(env, "WORLD_SIZE", default=1),
        rank=_int(env, "RANK", default=0),
        local_rank=_int(env, "LOCAL_RANK", default=extra.get("local_rank", 0)),
    )
    if any(k in env for k in _ACCELERATE_MARKERS):
        req.launcher = "accelerate"
        if not _from_accelerate_env(req, env):
            if req.world_size > 1:
                req.backend = "ddp"
            elif _flag(env.get("ACCELERATE_USE_CPU")):
                # `accelerate launch --cpu` drops the FSDP/DeepSpeed variables: read the YAML it was given.
                parent = _parent_argv() if parent_argv is None else list(parent_argv)
                yaml_path = _option(parent, "--config_file") or _option(parent, "--config-file")
                if yaml_path and Path(yaml_path).is_file():
                    try:
                        with open(yaml_path) as f:
                            _from_accelerate_yaml(req, yaml.safe_load(f) or {})
                    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as err:
                        req.notes.append(f"could not read {yaml_path}: {err}")
                    else:
                        req.source = "parent-argv"
                        req.notes.append(f"backend read from {yaml_path} (accelerate launch --cpu exports none)")
        return req
    ds_env = all(k in env for k in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"))
    if ds_env or "deepspeed_config" in extra or extra.get("deepspeed"):
        req.launcher = "deepspeed"
        req.backend = "deepspeed"
        req.source = "env" if ds_env else "argv"
        _apply_deepspeed_file(req, extra.get("deepspeed_config"))
        return req
    if "TORCHELASTIC_RUN_ID" in env or "local_rank" in extra:
        req.launcher = "torchrun"  # torch.distributed.launch (--local_rank) counts as torchrun
        req.source = "env" if "TORCHELASTIC_RUN_ID" in env else "argv"
        if req.world_size > 1:
            req.notes.append("torchrun names no backend: parallel.backend decides (ddp if it says none)")
    return req


# ---------------------------------------------------------------- config


def explicit_parallel_keys(overrides: Iterable[str]) -> set[str]:
    """`parallel.*` field names set on the command line ("parallel.backend=x" or "parallel.backend")."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("parallel."):
            keys.add(key.split(".")[1])
    return keys


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None:
        return a == b
    return resolve_path(a) == resolve_path(b)


def _conflict(key: str, mine: Any, theirs: Any, by: str) -> ConfigError:
    return ConfigError(
        f"parallel.{key}={mine!r} was set on the command line, but {by} asks for {key}={theirs!r}: "
        f"drop the override or launch differently (see launch/README.md)"
    )


def apply_launch_request(cfg: RunConfig, request: LaunchRequest, *, explicit: Iterable[str] = ()) -> RunConfig:
    """`cfg` with `parallel.*` taken from the launcher where it stated something.

    `explicit` holds the command-line overrides (e.g. args.overrides): values
    they set must agree with the launcher, else ConfigError. Values that came
    from a preset or YAML yield to the launcher (logged). With a DeepSpeed
    JSON in play, zero_stage, precision and cpu_offload follow that file.
    """
    keys = explicit_parallel_keys(explicit)
    p = dataclasses.replace(cfg.parallel)
    by = request.describe()

    if request.precision == "fp8":
        raise ConfigError(f"{by} asks for fp8 mixed precision; harness supports fp32, fp16 and bf16")
    if request.fsdp_version is not None and request.fsdp_version != 2:
        raise ConfigError(f"{by} asks for FSDP version {request.fsdp_version}; harness implements FSDP2 only: "
                          "set fsdp_version: 2 in the Accelerate YAML (launch/accelerate/fsdp2.yaml)")
    if (request.backend == "deepspeed" and request.deepspeed_config is None and request.zero_stage is not None
            and "deepspeed_config" not in keys):
        p.deepspeed_config = None  # DeepSpeed configured inline by the launcher: a preset's JSON does not apply
    for key, value in request.parallel_fields().items():
        current = getattr(p, key)
        same = _same_path(current, value) if key == "deepspeed_config" else current == value
        if same:
            continue
        if key in keys:
            raise _conflict(key, current, value, by)
        if current != getattr(ParallelConfig, key, None):
            log.warning("parallel.%s: %r from the config replaced by %r from %s", key, current, value, by)
        setattr(p, key, value)

    if p.deepspeed_config is not None and request.backend not in (None, "deepspeed"):
        if "deepspeed_config" in keys:
            raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config!r} was set on the command line, but "
                              f"{by} asks for backend={request.backend!r}: drop the override or launch with DeepSpeed")
        p.deepspeed_config = None  # a preset's DeepSpeed JSON does not apply to the backend the launcher chose

    if request.world_size > 1 and p.backend == "none":
        if "backend" in keys:
            raise ConfigError(f"parallel.backend=none was set on the command line, but {by} started "
                              f"{request.world_size} processes: use parallel.backend=ddp (or fsdp2, deepspeed)")
        p.backend = "ddp"

    _reconcile_deepspeed(p, keys)
    return dataclasses.replace(cfg, parallel=p)


def _reconcile_deepspeed(p: ParallelConfig, keys: set[str]) -> None:
    """Make parallel.* agree with the DeepSpeed JSON it names (in place)."""
    if p.deepspeed_config is None:
        return
    if p.backend != "deepspeed":
        if "backend" in keys:
            raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config!r} only applies to "
                              f"parallel.backend=deepspeed, not {p.backend!r}: drop one of them")
        p.backend = "deepspeed"
    fields = deepspeed_json_fields(read_deepspeed_json(p.deepspeed_config), f"DeepSpeed config {p.deepspeed_config}")
    if fields["zero_stage"] not in (1, 2, 3):
        raise ConfigError(f"DeepSpeed config {p.deepspeed_config} has ZeRO stage {fields['zero_stage']}; "
                          "harness runs stages 1-3 (for no sharding use parallel.backend=ddp)")
    for key, value in fields.items():
        current = getattr(p, key)
        if current == value:
            continue
        if key in keys:
            raise ConfigError(f"parallel.{key}={current!r} was set on the command line, but DeepSpeed config "
                              f"{p.deepspeed_config} implies {key}={value!r}: pick a matching file in "
                              "ds_configs/ or drop the override")
        setattr(p, key, value)
