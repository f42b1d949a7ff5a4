"""Bad steps (NaN/Inf) through the real loop, and the one-all-reduce step verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.checkpoint.layout import complete_checkpoints, read_manifest, read_tensors
from harness.config import load_config
from harness.ssl.swav import SwAV
from harness.train.errors import RunStopped
from harness.train.faults import step_verdict
from harness.train.loop import pretrain
from tests.distributed import run_distributed
from tests.parallel._common import runtime

TINY = [
    "data.batch_size=4", "data.num_workers=0", "train.log_with=[]", "schedule.warmup_iters=1",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "swav.freeze_prototypes_iters=0",
    "swav.queue_length=8", "swav.queue_start_iter=0",
]


def poison(monkeypatch, steps: set[int]) -> None:
    """A NaN loss at the given steps (0-based), after a normal forward."""
    loss = SwAV.loss

    def nan_loss(self, output, batch_size, iteration):
        value = loss(self, output, batch_size, iteration)
        return value * float("nan") if iteration in steps else value

    monkeypatch.setattr(SwAV, "loss", nan_loss)


def config(tmp_path, name, *extra):
    return load_config("quickstart", [*TINY, f"train.output_dir={tmp_path}", f"train.run_name={name}", *extra])


def test_a_bad_step_changes_nothing(tmp_path, monkeypatch):
    """Steps 0-2 then a NaN step 3: the weights, momentum AND buffers (BN statistics, the queue) after
    step 3 equal those after step 2; the step is logged as not applied; the run goes on."""
    pretrain(config(tmp_path, "clean", "train.iterations=3", "schedule.name=constant"))
    poison(monkeypatch, {3})
    result = pretrain(config(tmp_path, "nan", "train.iterations=4", "schedule.name=constant"))
    assert math.isnan(result.losses[3]) and all(math.isfinite(x) for x in result.losses[:3])
    clean, _ = read_tensors(complete_checkpoints(tmp_path / "clean")[-1], "")
    skipped, manifest = read_tensors(complete_checkpoints(tmp_path / "nan")[-1], "")
    assert manifest["step"] == 4 and clean.keys() == skipped.keys()
    assert all(torch.equal(clean[k], skipped[k]) for k in clean)
    queue = [torch.load(p, weights_only=False)["buffers"]["criterion.queue"]
             for p in (complete_checkpoints(tmp_path / n)[-1] / "rank_00000.pt" for n in ("clean", "nan"))]
    assert torch.equal(queue[0], queue[1]) and queue[0].abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stepped"] for r in records] == [1.0, 1.0, 1.0, 0.0]
    dump = torch.load(next((tmp_path / "nan").glob("bad_step_00000003_rank00000.pt")), weights_only=False)
    assert dump["step"] == 3 and len(dump["crops"]) == 4
    assert dump["scores"][0].shape == (4 * 4, 16) and dump["assignments"][0].shape == (4, 16)


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, {2, 4, 5})
    cfg = config(tmp_path, "run", "train.iterations=8", "train.checkpoint_every=2", "train.max_bad_steps=2")
    with pytest.raises(RunStopped, match="2 consecutive steps with a NaN/Inf .*last good checkpoint is intact"):
        pretrain(cfg)
    done = complete_checkpoints(tmp_path / "run")
    assert [read_manifest(c)["step"] for c in done] == [2, 4]  # step 2's bad step alone did not stop it
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))
    weights, _ = read_tensors(done[-1])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert len(list((tmp_path / "run").glob("bad_step_*.pt"))) == 1  # dumped once


def test_the_cli_reports_a_stopped_run_in_one_line(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    poison(monkeypatch, {0})
    code = main(["pretrain", *TINY, "train.iterations=3", "train.max_bad_steps=1", f"train.output_dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("pretrain:")]
    assert code == 3 and len(err) == 1 and err[0].startswith("harness: stopped: 1 consecutive steps"), err


def verdict_on_ranks(rank: int, world: int) -> list[tuple]:
    rt = runtime(rank, world)
    cases = [(1.0 + rank, None, False, False), (float("nan") if rank == 1 else 2.0, None, False, False),
             (1.0, torch.tensor(rank == 0), False, False), (1.0, None, rank == 1, rank == 1), (1.0, None, False, rank == 0)]
    out = []
    for loss, finite, stop, save in cases:
        pending = step_verdict(torch.tensor(loss), finite, stop, save, rt)  # on the device, not read yet
        verdict = pending.read()
        out.append(tuple("nan" if v != v else v for v in vars(verdict).values())[:4] + (bool(pending.bad),))
    return out


def test_verdict_agrees_on_every_rank():
    results = run_distributed(verdict_on_ranks, 2)
    assert results[0] == results[1]
    mean, nan_loss, nan_grad, stop, save = results[0]
    assert mean[:4] == (1.5, False, False, False) and stop[1:4] == (False, True, False)
    assert nan_loss[:2] == ("nan", True) and nan_grad[1]
    assert [case[4] for case in results[0]] == [False, True, True, False, False]  # the device flag agrees
    assert save[3] is True  # rank 0's clock decides
