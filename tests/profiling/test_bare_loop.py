"""profiling/bare_loop.py: the shortest tuned loop runs the quickstart's SwAV, trains it, and reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "profiling"))

import bare_loop  # noqa: E402

from harness.config import load_config  # noqa: E402

TINY = ["data.batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_cli_prints_and_writes_the_figures(tmp_path, capsys):
    out = tmp_path / "bare.json"
    result = bare_loop.main(["-c", "quickstart", *TINY, "--steps", "2", "--warmup", "1", "--device", "cpu",
                             "--json", str(out)])
    line = capsys.readouterr().out
    assert "bare loop quickstart (regnety_200mf, fp32, batch 4, fused SGD) on cpu:" in line
    assert "images/s" in line and "aten ops/step" in line
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["batch_size"] == 4 and written["crops"] == [64, 64, 32, 32, 32, 32]
    assert written["images_per_s"] > 0 and written["step_s"] > 0
    assert math.isclose(written["images_per_s"] * written["step_s"], 4, rel_tol=1e-9)
    assert math.isfinite(written["loss"])
    # a step makes no host synchronisation; every op is counted, views included
    assert written["syncs"] == 0
    assert 0 < written["kernels"] < written["ops"] <= written["aten_events"]


def test_steps_train_the_model_and_keep_prototypes_unit_rows():
    cfg = load_config("quickstart", TINY)
    method, crops = bare_loop.build(cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    loop = bare_loop.BareLoop(cfg, method, crops)
    losses = [float(loop.step()) for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    changed = [n for n, p in method.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)  # SGD moved every parameter (prototypes included: no freezing here)
    for head in method.prototypes.heads:
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))
