"""Predicted against measured memory, on the machine at hand, for any backend.

Each rank builds the real engine for a case, runs two steps (DDP rebuilds
its buckets and the optimizer allocates its state during those), measures
the third with `memory.measure_step`, and predicts the same case with
`planner.predict_memory`. Used by the test suite (gloo ranks on CPU) and by
profiling/memory_accuracy.py (which prints the table).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from harness.config import load_config
from harness.config.schema import RunConfig
from harness.profiling.records import Strategy

#: Tiny SwAV runs, one step in well under a second on a CPU core.
TINY = [
    "data.num_workers=0", "train.device=cpu", "data.batch_size=4",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "swav.freeze_prototypes_iters=0",
]
MODELS = {"regnety_200mf": [], "regnety_400mf": ["model.arch=regnety_400mf", "swav.head_dims=[440, 32, 16]"]}


def case_config(model: str, strategy: Strategy) -> RunConfig:
    from harness.profiling.records import apply_strategy

    cfg = load_config("quickstart", [*TINY, *MODELS[model]])
    return apply_strategy(cfg, strategy)


def measure_and_predict(rank: int, world: int, cases: list[tuple[str, Strategy]]) -> list[dict[str, Any]]:
    """For each (model, strategy): this rank's measured and predicted MemoryBreakdown as dicts."""
    from harness.parallel.build import build_engine
    from harness.profiling.memory import measure_step
    from harness.profiling.planner import predict_memory
    from harness.runtime import Runtime

    rt = Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    out = []
    for model, strategy in cases:
        cfg = case_config(model, strategy)
        engine = build_engine(cfg, rt, lr=0.01, num_crops=sum(c.count for c in cfg.data.crops))
        engine.train()
        g = torch.Generator().manual_seed(rank)
        crops = [torch.randn(cfg.data.batch_size, 3, c.size, c.size, generator=g)
                 for c in cfg.data.crops for _ in range(c.count)]

        def step(i: int, engine: Any = engine) -> None:
            for _ in range(cfg.train.grad_accum):
                engine.forward_backward(crops, i)
            engine.optimizer_step(i)

        step(0)
        step(1)
        measured = measure_step(engine, lambda: step(2), rt.device)
        predicted = predict_memory(cfg, strategy, world)
        out.append({"model": model, "strategy": strategy.to_dict(), "world": world,
                    "measured": asdict(measured), "predicted": asdict(predicted)})
        del engine
    return out


def fullest_rank(results: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per case, the measurement of the fullest rank (largest value of each category over
    ranks): the planner predicts the rank that runs out of memory first."""
    out = []
    for i, first in enumerate(results[0]):
        measured = {k: max(r[i]["measured"][k] or 0 for r in results) for k in first["measured"]}
        out.append({**first, "measured": measured})
    return out
