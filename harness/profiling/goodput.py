"""How often to checkpoint, and how much of a run failures cost: pure arithmetic.

A synchronous job that fails every M seconds on average (exponential
failures) and spends delta seconds per checkpoint loses time three ways: the
writes themselves, the work since the last checkpoint (redone after a
failure), and the restart (R seconds: relaunch plus loading the checkpoint).
Checkpointing often shrinks the rework and grows the write overhead; the
interval between them that balances the two is

* Young, J. W. (1974), "A first order approximation to the optimum
  checkpoint interval", Communications of the ACM 17(9):530-531:
  tau = sqrt(2 delta M), valid while delta << M;
* Daly, J. T. (2006), "A higher order estimate of the optimum checkpoint
  interval for restart dumps", Future Generation Computer Systems
  22(3):303-312: tau = sqrt(2 delta M) [1 + (delta/2M)^(1/2)/3 + (delta/2M)/9]
  - delta for delta < 2M, else tau = M; derived from his model of the
  expected wall-clock time T_w = M e^(R/M) (e^((tau+delta)/M) - 1) T_s / tau
  for T_s seconds of work, which `useful_fraction` evaluates (failures may
  strike during writes and restarts too).

tau is computing time between checkpoints (the write not included), as in
both papers. Default failure and storage figures come from the Llama 3
report (Dubey et al. 2024, "The Llama 3 Herd of Models", sections 3.3.1 and
3.3.4); where no source exists the default is a round assumption, and says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

HOUR = 3600.0
GB = 1e9  # storage bandwidths are decimal: GB/s as filesystems and NICs quote them

#: Llama 3 (Dubey et al. 2024, 3.3.4): 419 unexpected interruptions (466 in all, 47 planned
#: maintenance) in a 54-day snapshot of pretraining on up to 16,384 H100s. Planned ones are
#: announced, so they cost no rework: the unexpected ones set the failure rate. Per GPU that is
#: 54 x 24 h x 16,384 / 419 = 50,677 GPU-hours between failures; "up to" makes it an upper bound.
LLAMA3_DAYS, LLAMA3_GPUS, LLAMA3_UNEXPECTED = 54, 16_384, 419
GPU_MTBF_HOURS = LLAMA3_DAYS * 24 * LLAMA3_GPUS / LLAMA3_UNEXPECTED

#: Llama 3's storage (Dubey et al. 2024, 3.3.1): Tectonic sustains 2 TB/s for the 16,384-GPU
#: cluster, i.e. about 0.98 GB/s per 8-GPU node: the per-node default.
NODE_GBPS = 2000.0 / (LLAMA3_GPUS / 8)
#: Aggregate write bandwidth of the shared filesystem: a round assumption (a modest parallel
#: filesystem), not a measured figure; pass the real one with --storage-gbps.
STORAGE_GBPS = 10.0
#: Time a restarted job spends before it loads the checkpoint (rescheduling, launch, process-group
#: and NCCL set-up, model build, data-loader warm-up): a round assumption.
RESTART_MINUTES = 5.0


def young_interval(delta: float, mtbf: float) -> float:
    """Young (1974): the first-order optimum interval sqrt(2 delta M), seconds (delta, M in seconds)."""
    _check(delta=delta, mtbf=mtbf)
    return math.sqrt(2.0 * delta * mtbf)


def daly_interval(delta: float, mtbf: float) -> float:
    """Daly (2006): the higher-order optimum interval, seconds. It corrects Young's for
    checkpoints that are not short against the MTBF (and equals M once delta >= 2M, where
    any checkpointing barely pays)."""
    _check(delta=delta, mtbf=mtbf)
    if delta >= 2.0 * mtbf:
        return mtbf
    x = delta / (2.0 * mtbf)
    return math.sqrt(2.0 * delta * mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - delta


def useful_fraction(tau: float, delta: float, mtbf: float, restart: float) -> float:
    """Work done per wall-clock second under Daly's (2006) model, T_s / T_w =
    tau / (M e^(R/M) (e^((tau+delta)/M) - 1)); 1 - this is the expected fraction lost."""
    _check(tau=tau, mtbf=mtbf)
    _check(delta=delta, restart=restart, zero=True)
    return tau / (mtbf * math.exp(restart / mtbf) * math.expm1((tau + delta) / mtbf))


@dataclass(frozen=True)
class Loss:
    """Fractions of wall-clock time lost, to first order in delta/tau, tau/M and R/M (they add up
    to Daly's total while each is small): writes delta/(tau+delta), rework (tau+delta)/2M (half an
    interval per failure), restarts R/M."""

    checkpoint: float
    rework: float
    restart: float


def first_order_loss(tau: float, delta: float, mtbf: float, restart: float) -> Loss:
    _check(tau=tau, mtbf=mtbf)
    _check(delta=delta, restart=restart, zero=True)
    return Loss(delta / (tau + delta), (tau + delta) / (2.0 * mtbf), restart / mtbf)


def transfer_seconds(nbytes: float, nodes: int, storage_gbps: float, node_gbps: float = 0.0) -> float:
    """Seconds to move `nbytes` between `nodes` nodes and the shared filesystem, every rank writing
    (or reading) its share at once: at the filesystem's aggregate bandwidth, or at what the nodes'
    links give together when that is less (`node_gbps` 0: no per-node cap)."""
    _check(storage_gbps=storage_gbps)
    _check(nbytes=nbytes, node_gbps=node_gbps, zero=True)
    rate = storage_gbps if node_gbps <= 0 else min(storage_gbps, nodes * node_gbps)
    return nbytes / (rate * GB)


def job_mtbf_hours(gpus: int, gpu_mtbf_hours: float = GPU_MTBF_HOURS) -> float:
    """The whole job's MTBF: any of its GPUs failing stops a synchronous job, so it is the
    per-GPU MTBF over the GPU count (independent failures)."""
    _check(gpu_mtbf_hours=gpu_mtbf_hours, gpus=gpus)
    return gpu_mtbf_hours / gpus


@dataclass(frozen=True)
class Goodput:
    """The checkpoint plan of one run: Daly's interval (Young's beside it), in seconds and in
    steps, and the expected time lost with it."""

    interval_s: float
    young_s: float
    steps: int
    useful: float  # Daly's model, at `steps` steps between checkpoints
    loss: Loss
    save_s: float
    restart_s: float  # start-up plus load
    mtbf_s: float

    @property
    def lost(self) -> float:
        return 1.0 - self.useful

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost}


def plan(save_s: float, restart_s: float, mtbf_s: float, step_s: Optional[float] = None) -> Goodput:
    """Daly's interval for a checkpoint taking `save_s`, rounded to whole training steps of
    `step_s` (at least one) when given, with the loss expected at that rounded interval."""
    tau = daly_interval(save_s, mtbf_s)
    steps = max(1, round(tau / step_s)) if step_s else 0
    at = steps * step_s if step_s else tau
    return Goodput(interval_s=tau, young_s=young_interval(save_s, mtbf_s), steps=steps,
                   useful=useful_fraction(at, save_s, mtbf_s, restart_s),
                   loss=first_order_loss(at, save_s, mtbf_s, restart_s), save_s=save_s, restart_s=restart_s,
                   mtbf_s=mtbf_s)


def _check(zero: bool = False, **values: float) -> None:
    """Finite and positive (or non-negative with `zero`): anything else is a caller's bug here;
    the CLI turns user input into one-line errors before calling."""
    for name, v in values.items():
        if not (math.isfinite(v) and (v >= 0 if zero else v > 0)):
            raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'} and finite, got {v}")


@dataclass(frozen=True)
class Assumptions:
    """What the user says (or the defaults assume) about storage, failures and restarts."""

    storage_gbps: float = STORAGE_GBPS
    node_gbps: float = NODE_GBPS  # 0: no per-node cap
    mtbf_hours: Optional[float] = None  # the whole job's; None: gpu_mtbf_hours / GPUs
    gpu_mtbf_hours: float = GPU_MTBF_HOURS
    restart_minutes: float = RESTART_MINUTES

    def job_mtbf_hours(self, gpus: int) -> float:
        return self.mtbf_hours if self.mtbf_hours is not None else job_mtbf_hours(gpus, self.gpu_mtbf_hours)
