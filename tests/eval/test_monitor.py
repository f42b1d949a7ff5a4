"""`train.eval_every` on a sharded run: the live FSDP2 trunk's k-NN equals `harness eval knn` of its checkpoint.

Two gloo ranks pretrain 2 steps with FSDP2 (the trunk sharded block by
block) and evaluate the live trunk after step 2; then this one process
reads the final checkpoint (written by 2 ranks, read without consolidating)
and runs the offline evaluation. Same weights, same images: the accuracies
must be identical, and the live evaluation must have left training intact
(the run still ends at step 2 with a finite loss on both ranks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from harness.config import load_config
from tests.checkpoint.test_export import TINY
from tests.distributed import run_distributed

EVAL = ["eval.crop=32", "eval.resize=37", "eval.num_workers=0", "eval.batch_size=7", "eval.knn.k=3"]


def _pretrain(rank: int, world: int, out: str, scenes: str) -> dict:
    from harness.train.loop import pretrain

    cfg = load_config("quickstart", [*TINY, "parallel.backend=fsdp2", "data.batch_size=2", "train.eval_every=2",
                                     f"train.output_dir={out}", f"eval.data={scenes}", *EVAL])
    result = pretrain(cfg)
    return {"losses": result.losses, "run_dir": str(result.run_dir)}


def test_live_sharded_knn_equals_offline_knn_of_the_checkpoint(tmp_path):
    from harness.eval.commands import evaluate
    from harness.eval.scenes import write_scenes

    scenes = write_scenes(tmp_path / "scenes", per_class_train=3, per_class_val=2, size=32)
    results = run_distributed(_pretrain, 2, str(tmp_path), str(scenes), timeout=300)
    for r in results:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    run_dir = Path(results[0]["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    live = [r for r in records if "eval/knn_top1" in r]
    assert [r["step"] for r in live] == [2]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("quickstart", [*TINY, f"train.output_dir={tmp_path}", f"eval.data={scenes}", *EVAL])
        offline = evaluate("knn", cfg, str(run_dir), out=str(tmp_path / "offline"), show=False)
    finally:
        torch.set_num_threads(threads)
    assert offline["checkpoint"]["world_size"] == 2 and offline["checkpoint"]["backend"] == "fsdp2"
    assert offline["results"]["top1"] == live[0]["eval/knn_top1"]
    assert offline["results"]["top5"] == live[0]["eval/knn_top5"]
