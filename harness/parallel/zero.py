"""DeepSpeed ZeRO (stages 1-3) as a harness backend.

DeepSpeed owns the sharding, the gradient reduction and (fp16) the loss
scaler; the harness keeps the optimizer, because SEER's LARS needs
per-parameter trust ratios that no DeepSpeed optimizer computes on ZeRO
partitions (see `harness.optim.segmented_lars`). This module builds the
DeepSpeed config, reads ZeRO's partition layout for the optimizer, and
applies the method's step rules (`ParallelSpec`: SwAV's prototypes frozen at
first, unit rows after every step) on the fp32 master weights, which are the
truth under ZeRO: normalising only the module's copy would be undone by the
next step.

Start: ZeRO-3 models are built under ``deepspeed.zero.Init`` (`zero3_init`),
so each module's parameters are partitioned as soon as it exists, and each
rank writes its partition's initial values (`harness.models.init`) before
``deepspeed.initialize`` copies them into the fp32 masters; stages 1/2 keep a
full module per rank and start from a full replica. SyncBN and activation
checkpointing come from `harness.parallel.parallelize`, as for every backend.

Precision: fp32; bf16 through DeepSpeed's ``torch_autocast`` (its ``bf16``
mode casts BatchNorm to bf16 and breaks it); fp16 through ``torch_autocast``
float16 (weights, BN and prototypes stay fp32, as SEER's Apex O1) with the
GradScaler DeepSpeed attaches, replaced by `RankSyncedGradScaler` so that all
ranks skip the same steps. DeepSpeed's own ``fp16`` mode (ds_configs/*_fp16.json)
is accepted where the accelerator has it (CUDA; DeepSpeed's CPU accelerator
refuses fp16): it casts the module, BN and prototype copies included, to half
and keeps fp32 masters; prototype scores and Sinkhorn still run in fp32.

Checkpoints are harness.checkpoint's: it reads and writes the fp32 masters and
the LARS momentum as this rank's pieces (`MasterWeights.pieces`, `flat_of`),
never gathered. `state_dict`/`load_state_dict` here are the gathered full
model, for tests and tools that want one tensor per parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.optim.build import param_groups
from harness.optim.segmented_lars import FlatLayout, SegmentedLARS, layout_from_ranges
from harness.parallel.ds_json import deepspeed_json_fields, enabled, fill_auto, read_deepspeed_json
from harness.parallel.engine import Engine
from harness.parallel.precision import check_precision_supported
from harness.parallel.spec import ParallelSpec, gated
from harness.parallel.support import check_deepspeed_json, device_kind
from harness.runtime import Runtime

# ----------------------------------------------------------------- config


def config_precision(ds: dict[str, Any]) -> str:
    """The precision a DeepSpeed config asks for, in harness terms; DeepSpeed's bf16 mode refused."""
    if enabled(ds.get("bf16")) or enabled(ds.get("bfloat16")):
        raise ConfigError("DeepSpeed's bf16 mode casts BatchNorm to bf16 and breaks it: use a "
                          "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} section instead "
                          "(e.g. ds_configs/zero2_bf16.json)")
    return deepspeed_json_fields(ds, "deepspeed_config")["precision"]


def deepspeed_config(cfg: RunConfig, world_size: int, params: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed config dict: cfg.parallel.deepspeed_config (checked, "auto" filled) or built from cfg.

    `params` (the model's parameter count) sizes "auto" buckets; the capacity
    planner calls this too, so its predictions follow the same config."""
    par = cfg.parallel
    if par.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={par.zero_stage}: the deepspeed backend runs ZeRO stage 1, 2 or 3")
    if par.deepspeed_config:
        ds = read_deepspeed_json(par.deepspeed_config)
        stage = deepspeed_json_fields(ds, par.deepspeed_config)["zero_stage"]
        if stage != par.zero_stage:
            raise ConfigError(f"{par.deepspeed_config} runs ZeRO stage {stage} but parallel.zero_stage="
                              f"{par.zero_stage}: make them agree")
        precision = config_precision(ds)
        if precision != par.precision:
            raise ConfigError(f"{par.deepspeed_config} runs {precision} but parallel.precision={par.precision}: "
                              "make them agree")
    else:
        zero: dict[str, Any] = {"stage": par.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
        if par.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
            if par.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": 0.0, "zero_optimization": zero, "steps_per_print": 10**9}
        if par.precision == "bf16":
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        elif par.precision == "fp16":
            ds["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    refuse_unsupported_layouts(ds, par.deepspeed_config or "the generated DeepSpeed config")
    ds = fill_auto(ds, cfg, world_size, params)
    ds["zero_allow_untested_optimizer"] = True  # our LARS/SGD is a client optimizer
    # ZeRO-Offload refuses any client optimizer unless told otherwise; LARS has no DeepSpeed CPU kernel.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds["gradient_clipping"] = float(ds.get("gradient_clipping", 0.0) or 0.0)
    if ds["gradient_clipping"] > 0:
        raise ConfigError("deepspeed_config gradient_clipping > 0: SEER's LARS runs without clipping of the "
                          "global norm; set it to 0")
    return ds


# zero_optimization options that move parameters into layouts SegmentedLARS and MasterWeights
# do not read (secondary or MiCS partitions, quantized copies), with their "off" values.
UNSUPPORTED_ZERO_OPTIONS = {
    "mics_shard_size": (-1, None),
    "zero_hpz_partition_size": (1, None),
    "zero_quantized_weights": (False, None),
    "zero_quantized_nontrainable_weights": (False, None),
    "zero_quantized_gradients": (False, None),
}


def refuse_unsupported_layouts(ds: dict[str, Any], where: str) -> None:
    """Refuse ZeRO layouts whose partitions the harness cannot read exactly.

    Checked on CPU against DDP (tests/parallel/test_conformance.py): stages 1-3,
    round_robin_gradients, overlap_comm, contiguous_gradients, reduce_scatter,
    bucket sizes, stage-3 sub-groups and persistence, optimizer/parameter
    offload to CPU. The options below are not: they keep extra partitions or
    quantized copies that per-parameter LARS norms and prototype
    normalisation would not see.
    """
    zero = ds.get("zero_optimization") or {}
    for key, off in UNSUPPORTED_ZERO_OPTIONS.items():
        if zero.get(key, off[0]) not in off:
            raise ConfigError(f"{where}: zero_optimization.{key}={zero[key]!r} is not supported with the harness's "
                              f"LARS (it reads ZeRO's plain partitions only): remove it or set it to {off[0]!r}")
    for section in ("offload_optimizer", "offload_param"):
        device = str((zero.get(section) or {}).get("device", "none")).lower()
        if device not in ("none", "cpu"):
            raise ConfigError(f"{where}: zero_optimization.{section}.device={device!r} is not supported "
                              "(only \"cpu\" offload is tested): use \"cpu\" or \"none\"")


def import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed with the accelerator matching `device` (DS_ACCELERATOR is read once, at import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if os.environ["DS_ACCELERATOR"] != "cpu":
            raise ConfigError("train.device=cpu but DS_ACCELERATOR is set to another accelerator: unset it")
    import deepspeed

    return deepspeed


def zero_config(cfg: RunConfig, rt: Runtime, params: Optional[int] = None) -> dict[str, Any]:
    """The checks of a DeepSpeed run (one line each, before anything is built), then its config."""
    check_deepspeed_json(cfg, device_kind(rt.device))  # also for callers that skip the CLI's checks
    check_precision_supported(cfg.parallel.precision, rt.device)
    return deepspeed_config(cfg, rt.world_size, params)


def zero3_init(ds_config: dict[str, Any], rt: Runtime, dtype: torch.dtype = torch.float32) -> Any:
    """``deepspeed.zero.Init``: modules built inside it are partitioned as each is constructed
    (the largest transient is one module's own parameters), in the module's weight dtype
    (half under DeepSpeed's fp16 mode, as deepspeed.initialize would cast it)."""
    ds = import_deepspeed(rt.device)
    os.environ.setdefault("LOCAL_RANK", str(rt.local_rank))  # zero.Init and initialize read it
    # DeepSpeed's view of the torch process group, as deepspeed.initialize makes it: without it
    # zero.Init reads the config's batch sizes against a world size of 1
    ds.comm.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
    weight = torch.float16 if enabled(ds_config.get("fp16")) else dtype
    return ds.zero.Init(config_dict_or_path=ds_config, dtype=weight)


# ----------------------------------------------------------------- layouts

# One run of a flat fp32 partition: (param index, start in the flat, start in the flattened param, length).
Piece = tuple[int, int, int, int]


@dataclass
class FlatPieces:
    """What one ZeRO flat partition of this rank holds, read from ZeRO's bookkeeping once."""

    flat: torch.Tensor
    group: Any
    params: list[nn.Parameter]
    pieces: list[Piece]

    def layout(self) -> FlatLayout:
        layout = layout_from_ranges(self.params, [(k, at, n) for k, at, _, n in self.pieces],
                                    self.flat.numel(), self.group)
        layout.validate(self.flat.numel())
        return layout


def stage12_pieces(zero_opt: Any) -> list[FlatPieces]:
    """Stage 1/2 (`DeepSpeedZeroOptimizer`, deepspeed 0.19.8): group i is flattened
    as ``round_robin_bit16_groups[i]`` at ``round_robin_bit16_offsets[i]`` (alignment
    padding between and after), cut into equal ``partition_size[i]`` slices; rank
    r's ``single_partition_of_fp32_groups[i]`` is slice r. With
    ``round_robin_gradients`` the flattening order is not the parameter order."""
    out = []
    for i, flat in enumerate(zero_opt.single_partition_of_fp32_groups):
        group = zero_opt.real_dp_process_group[i]
        size = int(zero_opt.partition_size[i])
        lo = dist.get_rank(group=group) * size
        params = list(zero_opt.bit16_groups[i])
        index = {id(p): k for k, p in enumerate(params)}
        pieces = []
        for p, meta, offset in zip(zero_opt.round_robin_bit16_groups[i], zero_opt.round_robin_bit16_meta[i],
                                   zero_opt.round_robin_bit16_offsets[i]):
            start, end = max(offset, lo), min(offset + meta.numel(), lo + size)
            if start < end:
                pieces.append((index[id(p)], start - lo, start - offset, end - start))
        out.append(FlatPieces(flat, group, params, pieces))
    return out


def stage3_pieces(zero_opt: Any) -> list[FlatPieces]:
    """Stage 3 (`DeepSpeedZeroOptimizer_Stage3`): sub-group s is ``fp16_groups[s]``;
    each parameter's ``ds_tensor`` (``partition_numel()`` elements = elements
    [r*pn, (r+1)*pn) of the flattened parameter, padded past ``ds_numel``) is
    concatenated in order into ``fp32_partitioned_groups_flat[s]``."""
    out = []
    for s, flat in enumerate(zero_opt.fp32_partitioned_groups_flat):
        group = zero_opt.sub_group_process_groups[s]
        rank = dist.get_rank(group=group)
        params = list(zero_opt.fp16_groups[s])
        pieces, cursor = [], 0
        for k, p in enumerate(params):
            pn = int(p.partition_numel())
            pieces.append((k, cursor, rank * pn, max(0, min(pn, int(p.ds_numel) - rank * pn))))
            cursor += pn
        out.append(FlatPieces(flat, group, params, pieces))
    return out


class MasterWeights:
    """Full fp32 master weights read from, and written to, this rank's flat partitions.

    Why not DeepSpeed's ``safe_get_full_fp32_param``/``safe_set_full_fp32_param``:
    in deepspeed 0.19.8 their fragment map (``link_hp_params``) walks the
    parameters in their original order unless alignment padding exists, but
    ``round_robin_gradients`` flattens them in another order. Without padding
    (fp32 on CPU) every read and write then lands on another parameter's
    elements: prototype normalisation overwrote trunk weights and training
    silently diverged from DDP. This map is built from the same ZeRO
    bookkeeping as `SegmentedLARS`'s layouts, so the two cannot disagree.

    A read is one all-reduce (SUM) of a zero-filled buffer into which each
    rank copies the pieces it owns; every element has exactly one owner, so
    the sum is exact.
    """

    def __init__(self, flats: list[FlatPieces], device: torch.device) -> None:
        self.device = device
        self.pieces: dict[int, list[tuple[torch.Tensor, int, int, int]]] = {}
        self.flat_of: dict[int, torch.Tensor] = {}  # the flat partition (optimizer "parameter") of each param's group
        self.groups = {id(f.group): f.group for f in flats}
        for f in flats:
            self.flat_of.update((id(p), f.flat) for p in f.params)
            for k, at, start, n in f.pieces:
                if n > 0:
                    self.pieces.setdefault(id(f.params[k]), []).append((f.flat, at, start, n))
            for p in f.params:
                self.pieces.setdefault(id(p), [])
        if len(self.groups) > 1:
            raise ConfigError("ZeRO parameter groups over different data-parallel groups (MoE) are not supported")

    def owns(self, p: nn.Parameter) -> bool:
        return id(p) in self.pieces

    @torch.no_grad()
    def full(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """Each parameter's full fp32 master, flattened (collective over the data-parallel group)."""
        sizes = [int(getattr(p, "ds_numel", p.numel())) for p in params]
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        base = 0
        for p, size in zip(params, sizes):
            for flat, at, start, n in self.pieces[id(p)]:
                buffer[base + start:base + start + n].copy_(flat.data[at:at + n])
            base += size
        if dist.is_initialized():
            dist.all_reduce(buffer, group=next(iter(self.groups.values()), None))
        return list(buffer.split(sizes))

    @torch.no_grad()
    def set_full(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write this rank's pieces of `value` (the full parameter, any shape) into the masters."""
        value = value.reshape(-1)
        for flat, at, start, n in self.pieces[id(p)]:
            flat.data[at:at + n].copy_(value[start:start + n])


# ----------------------------------------------------------------- fp16 scaler

class RankSyncedGradScaler(torch.amp.GradScaler):
    """torch's GradScaler with the inf/NaN verdict all-reduced (MAX) over the data-parallel group.

    DeepSpeed's torch_autocast fp16 path gives each ZeRO optimizer a plain
    GradScaler, which inspects only this rank's gradient *partition*: one rank
    could skip a step that another applies (and our LARS all-reduce would then
    hang). Syncing the verdict makes every rank skip together, like DeepSpeed's
    own fp16 overflow check.
    """

    def __init__(self, device: str, group: Any = None, init_scale: float = 2.0**16) -> None:
        super().__init__(device=device, init_scale=init_scale)
        self.group = group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        total = torch.zeros((), dtype=torch.float32, device=self._device)
        for value in found.values():
            total += value.to(total.device).sum()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
        for key in list(found):
            found[key].copy_(total.to(found[key].device).expand_as(found[key]))
        if not found:
            found[total.device] = total


# ----------------------------------------------------------------- engine

def build_segmented_optimizer(method: nn.Module, cfg: RunConfig, lr: float,
                              spec: Optional[ParallelSpec] = None) -> SegmentedLARS:
    """The spec's parameter groups (as the other backends' optimizers); with LARS off every group is plain SGD."""
    groups = (spec.param_groups if spec is not None else param_groups)(method, cfg.optim)
    if not cfg.optim.lars.enabled:
        for g in groups:
            g["lars_adapt"] = False
    lars = cfg.optim.lars
    return SegmentedLARS(groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                         nesterov=cfg.optim.nesterov, trust_coefficient=lars.trust_coefficient,
                         eps=lars.eps, clip=lars.clip)


class ZeroEngine(Engine):
    """A method under a DeepSpeed engine with ZeRO stage 1, 2 or 3.

    `method` comes from `harness.parallel.parallelize` (started, SyncBN and
    checkpointing applied); this wraps it with ``deepspeed.initialize``."""

    name = "deepspeed"

    def __init__(self, method: nn.Module, cfg: RunConfig, rt: Runtime, lr: float,
                 spec: Optional[ParallelSpec] = None, ds_config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(method, cfg, rt, spec)
        params = sum(int(getattr(p, "ds_numel", p.numel())) for p in method.parameters())
        self.ds_config = zero_config(cfg, rt, params) if ds_config is None else ds_config
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        ds = import_deepspeed(rt.device)
        self._ds = ds
        # deepspeed.initialize asserts LOCAL_RANK, which only launchers export: one process has rank 0
        os.environ.setdefault("LOCAL_RANK", str(rt.local_rank))
        self.optimizer = build_segmented_optimizer(method, cfg, lr, self.spec)
        self.engine, _, _, _ = ds.initialize(model=method, optimizer=self.optimizer, config=self.ds_config,
                                             dist_init_required=False)
        self.zero_optimizer = self.engine.optimizer
        if self.zero_optimizer.optimizer is not self.optimizer:
            raise RuntimeError("DeepSpeed wrapped the client optimizer unexpectedly")
        flats = stage3_pieces(self.zero_optimizer) if self.stage == 3 else stage12_pieces(self.zero_optimizer)
        layouts = {id(f.flat): f.layout() for f in flats}
        self.optimizer.attach_layouts(layouts)
        self.masters = MasterWeights(flats, rt.device)
        self.scaler: Optional[RankSyncedGradScaler] = None
        if getattr(self.zero_optimizer, "torch_autocast_gradscaler", None) is not None:
            if len(layouts) > 1:
                raise ConfigError("deepspeed fp16 (torch_autocast) steps each flat group with its own scaler "
                                  "verdict: use one parameter group (optim.lars.exclude_bn_bias=false) or bf16")
            group = next(iter(layouts.values())).group
            self.scaler = RankSyncedGradScaler(rt.device.type, group)
            self.zero_optimizer.torch_autocast_gradscaler = self.scaler
        self._params = dict(method.named_parameters())
        self._micro = 0

    @property
    def module(self) -> nn.Module:
        return self.engine

    # -- steps -----------------------------------------------------------------

    def forward_backward(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = self.method.training_step(crops, step, forward=self.engine)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self._micro += 1
        if self._micro % self.cfg.train.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        return loss.detach(), metrics

    def optimizer_step(self, step: int, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DeepSpeed's step with our optimizer gated on the device (`skip`, the scaler's found_inf):
        DeepSpeed still does its bookkeeping (zeroes the partitions' gradients, counts the step)."""
        self.optimizer.frozen = {id(self._params[n]) for n in self.spec.frozen_at(step)}
        self.optimizer.skipped = None
        self.optimizer.skip = skip
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = None
        skipped = self.optimizer.skipped
        if self.scaler is not None and not self.engine.was_step_applied():
            # ZeRO's own overflow check (all-reduced over ranks, read on the host by DeepSpeed)
            # fired before the scaler was consulted: under torch_autocast, DeepSpeed reduces
            # fp16-module gradients in fp16, so scaled gradients overflow there, and the scaler
            # would never back off by itself.
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            skipped = torch.ones((), dtype=torch.bool, device=self.rt.device)
        elif skipped is None and not self.engine.was_step_applied():
            skipped = torch.ones((), dtype=torch.bool, device=self.rt.device)
        self.run_after_step(skipped)
        return self._stepped(skipped)

    @torch.no_grad()
    def run_after_step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """The spec's step hooks on the fp32 masters AND the module's copies (collective).

        Flat partitions cut a parameter anywhere (rows of a prototype matrix
        may be split between ranks), so each hooked parameter's full fp32
        master is gathered, the hook runs on it in the parameter's shape, and
        each rank writes its own master pieces back and refreshes the
        (possibly low-precision) module copy."""
        for hook in self.spec.after_step:
            params = [self._params[n] for n in hook.params]
            fn = gated(hook.fn, skipped)
            for p, full in zip(params, self.masters.full(params)):
                value = full.view(self._shape(p))
                fn(value)
                self.masters.set_full(p, full)
                self._set_module_copy(p, value)

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if self.stage == 3 else p.shape

    def _set_module_copy(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """The module's (possibly low-precision) copy; stage 3: through GatheredParameters,
        which re-partitions rank 0's write."""
        if self.stage == 3:
            with self._ds.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # -- state -------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter as its full fp32 master, plus buffers (collective, all ranks get it)."""
        named = list(self.method.named_parameters())
        owned = [p for _, p in named if self.masters.owns(p)]
        masters = {id(p): full for p, full in zip(owned, self.masters.full(owned))}
        out: dict[str, torch.Tensor] = {}
        for name, p in named:
            full = masters.get(id(p))
            if full is None:
                with self._ds.zero.GatheredParameters([p], enabled=self.stage == 3):
                    full = p.detach().clone().float()
            out[name] = full.detach().clone().cpu().view(self._shape(p))
        for name, buf in self.method.named_buffers():
            if buf is not None:
                out[name] = buf.detach().clone().cpu()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Collective: call on EVERY rank. Full fp32 model, this rank's optimizer partition, loss scale."""
        scaler: dict[str, Any] = {}
        if self.scaler is not None:
            scaler = self.scaler.state_dict()
        elif getattr(self.zero_optimizer, "loss_scaler", None) is not None:
            scaler = {"cur_scale": float(self.zero_optimizer.loss_scale)}
        return {"model": self.full_state_dict(), "optimizer": self.zero_optimizer.state_dict(),
                "scaler": scaler, "backend": {"name": "deepspeed", "zero_stage": self.stage,
                                              "world_size": self.rt.world_size, "rank": self.rt.rank}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Model (and BN buffers) from a full fp32 state dict, at any world size or stage."""
        model = state["model"]
        with torch.no_grad():
            for name, p in self.method.named_parameters():
                value = model[name].to(self.rt.device, torch.float32)
                if self.masters.owns(p):
                    self.masters.set_full(p, value)
                self._set_module_copy(p, value)
            for name, buf in self.method.named_buffers():
                if buf is not None and name in model:
                    buf.copy_(model[name])
        # Weights only: exact resume (momentum included) goes through harness.checkpoint.
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
