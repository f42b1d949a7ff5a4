"""The SwAV method: trunk + projection head + prototypes + swapped prediction.

The training loop only sees ``training_step`` and ``last_outputs`` (as
DINOv2 separates its method from its loop), and the backends only
``parallel_spec``: what SwAV
needs of them (synchronised BatchNorm in trunk and head, prototypes frozen at
first, kept in fp32 and re-normalised after every step, the trunk's blocks as
checkpoint and sharding units, its initialisation), so another SSL method can
be plugged in with the same surface.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from harness.config.schema import RunConfig, SwAVConfig
from harness.models.init import default_rules, normalize_rows_, torchvision_rules, unit_rows
from harness.models.stages import stage_names, stem_names
from harness.parallel.spec import Frozen, ParallelSpec, StepHook
from harness.ssl.swav.head import ProjectionHead, Prototypes
from harness.ssl.swav.loss import SwAVLoss
from harness.ssl.swav.single_pass import global_pool, single_pass_features


class SwAVOutput(NamedTuple):
    """A tuple, so DDP and other wrappers find the tensors in it."""

    embeddings: Tensor  # [n_crops*B, head_dims[-1]], L2-normalised, crop-major
    scores: list[Tensor]  # per prototype head: [n_crops*B, K_h], fp32


def resolution_groups(crops: list[Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops with the same spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class SwAV(nn.Module):
    """Multi-crop SwAV around any trunk mapping images [N,3,H,W] to [N, D]."""

    def __init__(
        self,
        trunk: nn.Module,
        cfg: SwAVConfig,
        num_crops: int,
        *,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_crops = int(num_crops)
        self.trunk = trunk
        if cfg.single_pass_pad:
            global_pool(trunk)  # refuses a trunk without the pool where the padding is cut, before any step
        self.head = ProjectionHead(cfg.head_dims, cfg.head_batchnorm)
        self.prototypes = Prototypes(cfg.head_dims[-1], cfg.num_prototypes)
        self.criterion = SwAVLoss(cfg, cfg.head_dims[-1], num_crops, group=group)
        # The queue is per rank: DDP must not overwrite it with rank 0's copy
        # (broadcast_buffers). DDP reads this attribute from the module it wraps,
        # so it applies when this module is the one wrapped.
        self._ddp_params_and_buffers_to_ignore = [
            f"criterion.{name}" for name, buf in self.criterion.named_buffers() if buf is not None
        ]

    @classmethod
    def from_config(cls, cfg: RunConfig, num_crops: int) -> "SwAV":
        """The method a run config describes (trunk from `model:`, head and loss from `swav:`).
        Build it under `torch.device("meta")` to size or shard it before it exists."""
        from harness.models import build_trunk_from_config

        return cls(build_trunk_from_config(cfg.model), cfg.swav, num_crops)

    def parallel_spec(self) -> ParallelSpec:
        """What every backend applies to SwAV, the same way (see harness.parallel.spec).

        SyncBN over trunk AND head (SEER synchronises all BN; VISSL's head BN
        too). Prototypes: no update for `freeze_prototypes_iters` steps
        (SwAV's freeze_prototypes_niters), unit rows after every step, fp32
        (Sinkhorn exponentiates scores / 0.05). Initialisation: the trunk as
        torchvision builds it, the head as torch's nn.Linear default, the
        prototypes likewise and then unit rows, as `Prototypes.__init__` does.
        """
        from harness.optim import param_groups

        protos = tuple(f"prototypes.{n}" for n, _ in self.prototypes.named_parameters())
        has_head = any(True for _ in self.head.parameters())
        init = {**torchvision_rules(self.trunk, "trunk"), **default_rules(self.head, "head"),
                **{n: unit_rows(r) for n, r in default_rules(self.prototypes, "prototypes").items()}}
        return ParallelSpec(
            sync_bn=("trunk", "head"),
            stages=tuple(f"trunk.{n}" for n in stage_names(self.trunk)),
            units=tuple(f"trunk.{n}" for n in stem_names(self.trunk)) + (("head",) if has_head else ()),
            fp32=("prototypes",),
            frozen=(Frozen(protos, int(self.cfg.freeze_prototypes_iters)),),
            after_step=(StepHook(protos, normalize_rows_, whole_rows=True),),
            param_groups=param_groups,
            init=init,
        )

    def trunk_features(self, crops: list[Tensor]) -> Tensor:
        """Pooled trunk features of all crops, crop-major [n_crops * B, D].

        One trunk pass per resolution group (2x224 + 4x96 -> 2 passes):
        batching a group's crops fills the accelerator better than one pass
        per crop and, with SyncBN, computes statistics over all of them. With
        ``swav.single_pass_pad``, one pass over all crops, the small ones
        zero-padded, as SEER-10B ran (harness.ssl.swav.single_pass).
        """
        if len(crops) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} crops, got {len(crops)}")
        batch = crops[0].shape[0]
        if any(c.shape[0] != batch for c in crops):
            raise ValueError("all crops must hold the same number of images")
        groups = resolution_groups(crops)
        if self.cfg.single_pass_pad and len(groups) > 1:
            return single_pass_features(self.trunk, crops)
        features = [self.trunk(torch.cat(crops[a:b])) for a, b in groups]
        return torch.cat(features) if len(features) > 1 else features[0]

    def forward(self, crops: list[Tensor]) -> SwAVOutput:
        z = F.normalize(self.head(self.trunk_features(crops)), dim=1)
        return SwAVOutput(z, self.prototypes(z))

    def loss(self, output: SwAVOutput, batch_size: int, iteration: int) -> Tensor:
        return self.criterion(output.embeddings, output.scores, batch_size, iteration, self.prototypes)

    def training_step(
        self,
        crops: list[Tensor],
        iteration: int,
        forward: Optional[Callable[[list[Tensor]], SwAVOutput]] = None,
    ) -> tuple[Tensor, dict[str, Union[Tensor, float]]]:
        """Forward and loss for one (micro-)batch, without reading anything back from the device.

        ``forward``: pass the wrapper (e.g. the DDP module) when this module
        is wrapped, so the wrapper's forward hooks run; defaults to ``self``.
        Metrics: ``loss`` is the detached device tensor (the caller reads it
        when it logs), ``queue_active`` (with a queue) a host float.
        """
        output = (forward or self)(crops)
        self._last_scores = [s.detach() for s in output.scores]
        loss = self.loss(output, crops[0].shape[0], iteration)
        metrics: dict[str, Union[Tensor, float]] = {"loss": loss.detach()}
        if self.criterion.queue is not None:
            metrics["queue_active"] = float(self.criterion.queue_active(iteration))
        return loss, metrics

    def sync_host_state(self) -> None:
        """Re-read host copies of device state (the SwAV queue's fill level) after the
        buffers were overwritten behind the method's back: a checkpoint copied into
        them, a skipped step restored them. One device read; not for every step."""
        self.criterion.sync_host_state()

    def last_outputs(self) -> dict[str, list[Tensor]]:
        """The last step's prototype scores and Sinkhorn assignments (for a NaN post-mortem):
        per head, then per assigned crop, [B, K] each."""
        return {"scores": list(getattr(self, "_last_scores", [])),
                "assignments": [q for per_head in self.criterion.last_assignments for q in per_head.unbind(0)]}

    def cancel_prototype_gradients(self, iteration: int) -> None:
        """Drop prototype grads during the first ``freeze_prototypes_iters`` iterations.

        Call between backward and the optimizer step. A None grad makes SGD
        skip the parameter entirely (no momentum or weight-decay update),
        which is what freezing means; zeroed grads would still decay them.
        """
        if iteration < self.cfg.freeze_prototypes_iters:
            for p in self.prototypes.parameters():
                p.grad = None

    def normalize_prototypes(self) -> None:
        """Call after every optimizer step."""
        self.prototypes.normalize_()
