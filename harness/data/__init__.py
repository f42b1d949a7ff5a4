"""Images -> multi-crop batches: sources (folders, indexes, lists, tar shards, built-in, synthetic),
the global resumable order, robust decoding, multi-crop augmentation, the device-side finish.

Names are imported on first use (PEP 562), so that `harness data ...` and
`harness config` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BUILTIN_PHOTOS": "builtin", "builtin_image_paths": "builtin",
    "find_images": "images", "to_rgb": "decode",
    "IndexedBatches": "loader", "SyntheticBatches": "loader", "collate_views": "loader", "sample_seed": "loader",
    "Permutation": "order", "pass_permutation": "order",
    "DataStream": "stream", "IndexedReader": "stream", "ShardReader": "stream", "build_stream": "stream",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'harness.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness.data.{_WHERE[name]}"), name)
