"""Flat tensors: the one layout every backend writes its checkpoint in.

Every parameter, momentum buffer and BatchNorm buffer is stored as a 1-D
tensor of its element count, cut into whatever pieces the writing rank holds.
Why flat: ZeRO-1/2 cut parameters at arbitrary element offsets of a flat
partition, ZeRO-3 by equal element ranges of each flattened parameter, FSDP2
by rows, DDP not at all; only the flattened view has all of these as
contiguous ranges, so one layout serves them all and torch.distributed.checkpoint
(DCP) reshards between them on load (ZeRO-3 x 4 -> FSDP2 x 2 -> DDP x 1).

DCP reads and writes these ranges through `ShardedTensor`s built WITHOUT a
collective (`_init_from_local_shards_and_global_metadata`): the pieces a rank
does not hold are described as belonging to another rank, which DCP's
planners never look at (they use local shards only). Replicas (DDP, HSDP)
declare the same piece and DCP's save planner keeps one of them, so
replicated tensors are written once, spread over ranks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class FlatTensor:
    """The pieces of one flattened tensor held by this rank: (element offset, contiguous 1-D view)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "FlatTensor":
        """A tensor this rank holds entirely (DDP, one process, buffers)."""
        return cls(tuple(tensor.shape), tensor.dtype, [(0, tensor.detach().view(-1))] if tensor.numel() else [])

    def to_dcp(self) -> torch.Tensor:
        """What DCP saves from / loads into: a 1-D view when this rank holds it all (replicas are
        deduplicated by DCP), else a `ShardedTensor` whose shards are views of `pieces`."""
        if len(self.pieces) == 1 and self.pieces[0][0] == 0 and self.pieces[0][1].numel() == self.numel:
            return self.pieces[0][1]
        return self.sharded()

    def sharded(self) -> torch.Tensor:
        with warnings.catch_warnings():  # torch.distributed._shard announces its own deprecation
            warnings.simplefilter("ignore")
            from torch.distributed._shard.metadata import ShardMetadata
            from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
            from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

            rank = dist.get_rank() if dist.is_initialized() else 0
            world = dist.get_world_size() if dist.is_initialized() else 1
            other = f"rank:{(rank + 1) % world}/cpu"
            shards, metas, at = [], [], 0
            for offset, piece in sorted(self.pieces, key=lambda p: p[0]):
                if piece.numel() == 0:
                    continue
                device = "cpu" if piece.device.type == "cpu" else f"{piece.device.type}:{piece.device.index or 0}"
                meta = ShardMetadata([offset], [piece.numel()], f"rank:{rank}/{device}")
                if offset > at:
                    metas.append(ShardMetadata([at], [offset - at], other))
                metas.append(meta)
                shards.append(Shard(piece, meta))
                at = offset + piece.numel()
            if at < self.numel or not metas:
                metas.append(ShardMetadata([at], [max(self.numel - at, 0)], other))
            props = TensorProperties(dtype=self.dtype)
            global_meta = ShardedTensorMetadata(metas, torch.Size([self.numel]), props)
            return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_meta)
