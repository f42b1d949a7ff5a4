"""SwAV's swapped prediction loss, with the optional per-rank embedding queue."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from harness.config.schema import SwAVConfig
from harness.ssl.swav.head import Prototypes
from harness.ssl.swav.sinkhorn import sinkhorn_knopp


def _crop_selector(crops: list[int]) -> Union[slice, list[int]]:
    """A slice picking these crops from a [n_crops, ...] view when they are evenly spaced
    (always so for SwAV's and SEER's [0, 1]): a view, no copy, no index tensor on the device."""
    step = crops[1] - crops[0] if len(crops) > 1 else 1
    if step > 0 and crops == list(range(crops[0], crops[-1] + 1, step)):
        return slice(crops[0], crops[-1] + 1, step)
    return crops


class SwAVLoss(nn.Module):
    """Predict the Sinkhorn code of one crop from every other crop.

    For each prototype head and each crop in ``crops_for_assign``, the crop's
    scores give equipartitioned codes q (no gradient); every other crop is
    trained to predict q with a softmax at ``temperature``. Losses are
    averaged over the other crops, the assigned crops and the heads, so the
    value does not scale with their counts.

    Vectorised over crops (the same value as crop-by-crop, up to rounding):
    per head, one log-softmax over all crops' rows, one Sinkhorn call for all
    assigned crops (each crop still its own problem, `sinkhorn_knopp`'s
    [A, B, K] stack), and the cross-entropy of every (assigned crop c, other
    crop v) pair as sum_v log p_v - log p_c against q_c, in a few whole-tensor
    ops: the step's op count and collectives do not grow with the crops.

    Queue (``queue_length`` > 0): small per-rank batches give Sinkhorn too few
    samples to equipartition over thousands of prototypes, so the embeddings
    of recent assigned crops are kept and their scores recomputed with the
    *current* prototypes before Sinkhorn; only the current batch's codes are
    used. As in SwAV, the queue joins only once it is full and
    ``iteration >= queue_start_iter``; it is filled from the first step, so
    it is ready at the start iteration. It is a persistent buffer so that a
    resumed run continues with the same contents. Its fill level is known on
    the host (``queue_fill``) so deciding whether it joins needs no device
    read; the ``queue_count`` buffer mirrors it for checkpoints. Whoever
    writes the buffers behind the module's back (a checkpoint loader copying
    them, a skipped step restoring them) calls `sync_host_state` afterwards;
    ``load_state_dict`` does so by itself.
    """

    queue: Optional[Tensor]
    queue_count: Optional[Tensor]

    def __init__(
        self,
        cfg: SwAVConfig,
        embedding_dim: int,
        num_crops: int,
        *,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"swapped prediction needs at least 2 crops, got {num_crops}")
        assign = [int(c) for c in cfg.crops_for_assign]
        if not assign or any(not 0 <= c < num_crops for c in assign) or len(set(assign)) != len(assign):
            raise ValueError(
                f"crops_for_assign must be distinct crop indices in [0, {num_crops}), got {cfg.crops_for_assign}"
            )
        if cfg.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {cfg.temperature}")
        if cfg.queue_length < 0:
            raise ValueError(f"queue_length must be >= 0, got {cfg.queue_length}")
        self.num_crops = int(num_crops)
        self.crops_for_assign = assign
        self._assigned = _crop_selector(assign)  # picks the assigned crops from [n_crops, B, ...]
        self.temperature = float(cfg.temperature)
        self.epsilon = float(cfg.epsilon)
        self.sinkhorn_iterations = int(cfg.sinkhorn_iterations)
        self.sinkhorn_fp64 = bool(cfg.sinkhorn_fp64)
        self.queue_length = int(cfg.queue_length)
        self.queue_start_iter = int(cfg.queue_start_iter)
        self.group = group
        self.queue_fill = 0  # host copy of queue_count
        self.last_assignments: list[Tensor] = []
        if self.queue_length > 0:
            self.register_buffer("queue", torch.zeros(len(assign), self.queue_length, embedding_dim))
            # Number of valid rows; explicit rather than SwAV's "last row non-zero" test.
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        else:
            self.register_buffer("queue", None)
            self.register_buffer("queue_count", None)

    def queue_active(self, iteration: int) -> bool:
        """Whether the queue joins Sinkhorn at ``iteration`` (host state only: no device read)."""
        return self.queue is not None and iteration >= self.queue_start_iter and self.queue_fill >= self.queue_length

    def sync_host_state(self) -> None:
        """Re-read the queue's fill level from the ``queue_count`` buffer (one device read).

        Call after the buffers were overwritten other than through this
        module's forward: a checkpoint copied into them, a skipped step
        restored them."""
        count = self.queue_count
        if count is not None and not count.is_meta:
            self.queue_fill = int(count)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_host_state()

    def _assigned_crops(self, x: Tensor) -> Tensor:
        """[n_crops, B, ...] -> [A, B, ...], the assigned crops in ``crops_for_assign`` order."""
        if isinstance(self._assigned, slice):
            return x[self._assigned]
        return torch.stack([x[c] for c in self._assigned])  # uneven or unordered crop ids: rare

    def forward(
        self,
        embeddings: Tensor,
        scores: list[Tensor],
        batch_size: int,
        iteration: int,
        prototypes: Prototypes,
    ) -> Tensor:
        """embeddings: [n_crops*B, D], crop-major; scores[h]: [n_crops*B, K_h]."""
        n, B, A = self.num_crops, batch_size, len(self.crops_for_assign)
        rows = n * B
        if batch_size < 1 or embeddings.shape[0] != rows:
            raise ValueError(f"expected {rows} embedding rows ({n} crops x {batch_size}), got {embeddings.shape[0]}")
        if len(scores) != len(prototypes.heads) or any(s.shape[0] != rows for s in scores):
            raise ValueError("need one [n_crops*B, K] score tensor per prototype head")

        queue_scores: list[Tensor] = []
        if self.queue_active(iteration):
            assert self.queue is not None
            with torch.no_grad():
                # All assigned crops' rows in one call, through the module's forward
                # so that sharding hooks can gather it.
                queue_scores = prototypes(self.queue.flatten(0, 1))

        cross: list[Tensor] = []
        self.last_assignments = []  # per head [A, B, K]; references, no copies (NaN post-mortem)
        for h, head_scores in enumerate(scores):
            K = head_scores.shape[1]
            head_scores = head_scores.float().reshape(n, B, K)
            with torch.no_grad():
                out = self._assigned_crops(head_scores)
                if queue_scores:
                    out = torch.cat([queue_scores[h].view(A, self.queue_length, K), out], dim=1)
                q = sinkhorn_knopp(
                    out, self.epsilon, self.sinkhorn_iterations, group=self.group, use_fp64=self.sinkhorn_fp64
                )[:, -B:]
                self.last_assignments.append(q)
            # log_softmax is per row: the same values as crop by crop.
            log_p = F.log_softmax(head_scores / self.temperature, dim=2)
            # sum over v != c of q_c . log p_v = q_c . (sum_v log p_v - log p_c), for all c at once.
            others = log_p.sum(dim=0) - self._assigned_crops(log_p)
            cross.append((q * others).sum())
        total = cross[0] if len(cross) == 1 else torch.stack(cross).sum()
        # Mean over samples, other crops, assigned crops and heads.
        loss = total * (-1.0 / (B * (n - 1) * A * len(scores)))

        if self.queue is not None:
            self._enqueue(embeddings.detach(), B)
        return loss

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor, batch_size: int) -> None:
        """Newest first: the batch goes to the front, the oldest rows fall off."""
        assert self.queue is not None and self.queue_count is not None
        B, L = batch_size, self.queue_length
        fresh = self._assigned_crops(embeddings.reshape(self.num_crops, B, -1)).to(self.queue.dtype)
        if B < L:
            fresh = torch.cat([fresh, self.queue[:, : L - B]], dim=1)
        self.queue.copy_(fresh[:, :L] if B > L else fresh)
        self.queue_fill = min(self.queue_fill + B, L)
        self.queue_count.fill_(self.queue_fill)
