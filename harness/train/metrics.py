"""Where the numbers of a run go: a JSONL file (for scripts), the trackers of
`train.log_with` (TensorBoard, W&B, MLflow: harness.train.trackers) and the
tqdm bar (for the terminal). Only the main rank writes, so multi-process runs
produce one log and one tracker run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from harness.train.trackers import RunInfo, Tracker, build_trackers


class MetricsLogger:
    """Fans each record out to metrics.jsonl and the trackers.

    metrics.jsonl holds one line per `log` call, `{"step", "time", ...}`:
    training metrics under their bare names (`loss`, `lr`: what tools and
    tests read), any other prefix in the key (`eval/knn_top1`). Trackers get
    every key as `<prefix>/<key>`. `command` defaults to this process's
    sys.argv; `start_step` is where this job starts (a resumed checkpoint's
    step), so TensorBoard hides the old job's events past it.
    """

    def __init__(self, run_dir: Path, enabled: bool, log_with: Sequence[str] = (),
                 config: Optional[dict[str, Any]] = None, command: Optional[Sequence[str]] = None,
                 run_name: Optional[str] = None, *, start_step: int = 0) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._trackers: list[Tracker] = []
        if not enabled:
            return
        config = config or {}
        run = RunInfo(run_dir, run_name or run_dir.name, str(config.get("name") or "harness"), config,
                      list(sys.argv if command is None else command), start_step)
        self._trackers = build_trackers(list(log_with), run)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        named = metrics if prefix == "train" else {f"{prefix}/{key}": value for key, value in metrics.items()}
        record: dict[str, Any] = {"step": step, "time": time.time(), **named}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        tagged = {f"{prefix}/{key}": float(value) for key, value in metrics.items()}
        for tracker in list(self._trackers):
            try:
                tracker.log(tagged, step)
            except Exception as err:  # a tracker's outage must not end the training: metrics.jsonl has it all
                print(f"harness: {type(tracker).__name__} failed ({type(err).__name__}: {err}); it is dropped "
                      "for the rest of the run, metrics.jsonl goes on", file=sys.stderr, flush=True)
                self._trackers.remove(tracker)
                self._close(tracker)

    @staticmethod
    def _close(tracker: Tracker) -> None:
        try:
            tracker.close()
        except Exception as err:  # closing one must not keep the others (or the JSONL) open
            print(f"harness: closing {type(tracker).__name__} failed ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            self._close(tracker)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def progress_bar(start: int, total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="pretrain", mininterval=1.0)
