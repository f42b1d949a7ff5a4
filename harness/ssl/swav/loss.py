"""SwAV's swapped prediction loss, with the optional per-rank embedding queue."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from harness.config.schema import SwAVConfig
from harness.ssl.swav.head import Prototypes
from harness.ssl.swav.sinkhorn import sinkhorn_knopp


class SwAVLoss(nn.Module):
    """Predict the Sinkhorn code of one crop from every other crop.

    For each prototype head and each crop in ``crops_for_assign``, the crop's
    scores give equipartitioned codes q (no gradient); every other crop is
    trained to predict q with a softmax at ``temperature``. Losses are
    averaged over the other crops, the assigned crops and the heads, so the
    value does not scale with their counts.

    Queue (``queue_length`` > 0): small per-rank batches give Sinkhorn too few
    samples to equipartition over thousands of prototypes, so the embeddings
    of recent assigned crops are kept and their scores recomputed with the
    *current* prototypes before Sinkhorn; only the current batch's codes are
    used. As in SwAV, the queue joins only once it is full and
    ``iteration >= queue_start_iter``; it is filled from the first step, so
    it is ready at the start iteration. It is a persistent buffer so that a
    resumed run continues with the same contents.
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
        self.temperature = float(cfg.temperature)
        self.epsilon = float(cfg.epsilon)
        self.sinkhorn_iterations = int(cfg.sinkhorn_iterations)
        self.sinkhorn_fp64 = bool(cfg.sinkhorn_fp64)
        self.queue_length = int(cfg.queue_length)
        self.queue_start_iter = int(cfg.queue_start_iter)
        self.group = group
        if self.queue_length > 0:
            self.register_buffer("queue", torch.zeros(len(assign), self.queue_length, embedding_dim))
            # Number of valid rows; explicit rather than SwAV's "last row non-zero" test.
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        else:
            self.register_buffer("queue", None)
            self.register_buffer("queue_count", None)

    def queue_active(self, iteration: int) -> bool:
        return (
            self.queue is not None
            and iteration >= self.queue_start_iter
            and int(self.queue_count) >= self.queue_length
        )

    def forward(
        self,
        embeddings: Tensor,
        scores: list[Tensor],
        batch_size: int,
        iteration: int,
        prototypes: Prototypes,
    ) -> Tensor:
        """embeddings: [n_crops*B, D], crop-major; scores[h]: [n_crops*B, K_h]."""
        rows = self.num_crops * batch_size
        if batch_size < 1 or embeddings.shape[0] != rows:
            raise ValueError(
                f"expected {rows} embedding rows ({self.num_crops} crops x {batch_size}), got {embeddings.shape[0]}"
            )
        if len(scores) != len(prototypes.heads) or any(s.shape[0] != rows for s in scores):
            raise ValueError("need one [n_crops*B, K] score tensor per prototype head")

        use_queue = self.queue_active(iteration)
        queue_scores: list[list[Tensor]] = []
        if use_queue:
            assert self.queue is not None
            with torch.no_grad():
                # Through the module's forward so that sharding hooks can gather it.
                queue_scores = [prototypes(self.queue[i]) for i in range(len(self.crops_for_assign))]

        B = batch_size
        log_probs = [
            [F.log_softmax(s[B * v : B * (v + 1)].float() / self.temperature, dim=1) for v in range(self.num_crops)]
            for s in scores
        ]
        total = embeddings.new_zeros((), dtype=torch.float32)
        self.last_assignments = []  # kept (references, no copies) for the post-mortem of a NaN step
        for h, head_scores in enumerate(scores):
            head_loss = total.new_zeros(())
            for i, crop_id in enumerate(self.crops_for_assign):
                with torch.no_grad():
                    out = head_scores[B * crop_id : B * (crop_id + 1)].detach().float()
                    if use_queue:
                        out = torch.cat([queue_scores[i][h], out])
                    q = sinkhorn_knopp(
                        out, self.epsilon, self.sinkhorn_iterations, group=self.group, use_fp64=self.sinkhorn_fp64
                    )[-B:]
                    self.last_assignments.append(q)
                sub = total.new_zeros(())
                for v in range(self.num_crops):
                    if v != crop_id:
                        sub = sub - (q * log_probs[h][v]).sum(dim=1).mean()
                head_loss = head_loss + sub / (self.num_crops - 1)
            total = total + head_loss / len(self.crops_for_assign)
        loss = total / len(scores)

        if self.queue is not None:
            self._enqueue(embeddings.detach(), B)
        return loss

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor, batch_size: int) -> None:
        """Newest first: the batch goes to the front, the oldest rows fall off."""
        assert self.queue is not None and self.queue_count is not None
        B, L = batch_size, self.queue_length
        for i, crop_id in enumerate(self.crops_for_assign):
            fresh = embeddings[B * crop_id : B * (crop_id + 1)].to(self.queue.dtype)
            self.queue[i] = torch.cat([fresh, self.queue[i]])[:L]
        self.queue_count.fill_(min(int(self.queue_count) + B, L))
