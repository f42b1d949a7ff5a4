"""Experiment trackers: TensorBoard, Weights & Biases and MLflow behind one small interface.

`train.log_with` picks any of them; metrics.jsonl (harness.train.metrics) is
written whatever it says. Each tracker records the resolved config and the
command line, continues the same tracker run when the run folder is resumed
(its run id is kept in the run folder), and works with no network:

* W&B runs offline (files under `<run>/wandb/`, `wandb sync` uploads them)
  unless WANDB_MODE says otherwise or this machine has W&B credentials
  (`wandb login`, WANDB_API_KEY): then wandb decides as it always does. Without
  this, wandb.init on a machine never logged in asks for a key or fails.
* MLflow logs to MLFLOW_TRACKING_URI when set (a tracking server), else to a
  SQLite file `<run>/mlflow.db` with artifacts in `<run>/mlartifacts/`: MLflow's
  own default store since 3.7. Its file store (`./mlruns`) is legacy, and
  MLflow 3.17 refuses it unless MLFLOW_ALLOW_FILE_STORE=true is set.

Hand-written over each library's public client rather than accelerate's
`accelerate.tracking` (which has all three): those initialise accelerate's
PartialState (a second owner of the process group), start W&B and MLflow
through their global run APIs without resumable ids or an offline default,
and drop over-long MLflow params instead of truncating them.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

import yaml

from harness.config.loader import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
WANDB_ID_FILE = "wandb-run-id"  # in the run folder: a resumed run continues the same W&B run
MLFLOW_RUN_FILE = "mlflow-run.json"  # {"tracking_uri", "run_id"}: the same for MLflow


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` (keys already prefixed, e.g. train/loss) at training step `step`."""

    def close(self) -> None:
        """Flush and end the tracker's run."""


@dataclass(frozen=True)
class RunInfo:
    """What every tracker records about the run."""

    run_dir: Path
    run_name: str
    experiment: str  # the config's name: W&B project and MLflow experiment unless WANDB_PROJECT/MLFLOW_EXPERIMENT_NAME
    config: dict[str, Any]
    command: list[str]
    start_step: int = 0  # the step this job starts from (0, or a resumed checkpoint's)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    @property
    def config_yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False, default_flow_style=None, width=100)


# ------------------------------------------------------------------ checks (before anything is built)

def check_log_with(names: Sequence[str]) -> None:
    """Known tracker names, each once (config only: `harness config show` checks it too)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.log_with names {name!r}, which is not one of {', '.join(TRACKERS)} "
                              "(metrics.jsonl is always written): e.g. train.log_with=[tensorboard,wandb]")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"train.log_with names {repeated[0]} twice: list each tracker once, "
                          f"e.g. train.log_with=[{','.join(dict.fromkeys(names))}]")


def required_modules(name: str, env: Mapping[str, str] = os.environ) -> tuple[tuple[str, ...], str]:
    """The modules tracker `name` imports here, and the pip line that installs them."""
    if name == "mlflow" and not env.get("MLFLOW_TRACKING_URI"):  # the local SQLite store needs SQLAlchemy
        return ("mlflow", "sqlalchemy", "alembic"), "pip install mlflow-skinny sqlalchemy alembic"
    package = {"mlflow": "mlflow-skinny"}.get(name, name)
    return (name,), f"pip install {package}"


def check_tracker_packages(names: Sequence[str],
                           find_spec: Callable[[str], Any] = importlib.util.find_spec) -> None:
    """Each tracker's package is installed: one line with the pip command, before any model or loader."""
    for name in names:
        modules, install = required_modules(name)
        missing = [m for m in modules if find_spec(m) is None]
        if missing:
            raise ConfigError(f"train.log_with names {name} but {', '.join(missing)} is not installed: "
                              f"`{install}`, or drop {name} from train.log_with")


# ------------------------------------------------------------------ TensorBoard

class TensorBoardTracker:
    """Event files under `<run>/tensorboard/`; config and command as text (TensorBoard's Text tab)."""

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed job re-logs the steps after its checkpoint: purge_step hides the old job's events
        # from there on, so curves do not double back.
        purge = run.start_step + 1 if run.start_step else None
        self._writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=purge)
        self._writer.add_text("config", f"```yaml\n{run.config_yaml}```", run.start_step)
        self._writer.add_text("command", f"`{run.command_line}`", run.start_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------------ Weights & Biases

def _has_wandb_credentials(env: Mapping[str, str]) -> bool:
    """An API key where wandb looks for one: the environment, or ~/.netrc as `wandb login` writes it."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(env: Mapping[str, str] = os.environ) -> str | None:
    """None (wandb's own choice) where the user set WANDB_MODE or has credentials; else "offline"."""
    return None if env.get("WANDB_MODE") or _has_wandb_credentials(env) else "offline"


class WandbTracker:
    """A W&B run named after the run folder; the step is logged as `step`, the x-axis of every chart.

    A custom x-axis rather than wandb's own `step=`: wandb drops rows whose
    step is below one it has seen, and a resumed job repeats the steps since
    its checkpoint.
    """

    def __init__(self, run: RunInfo) -> None:
        import wandb

        id_file = run.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or run.experiment, name=run.run_name, id=run_id,
            resume="allow", dir=str(run.run_dir), config={**run.config, "command": run.command_line},
            mode=wandb_mode(), reinit="create_new")
        self._run.define_metric("step", hidden=True)
        self._prefixes: set[str] = set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for prefix in {key.split("/", 1)[0] for key in metrics} - self._prefixes:
            self._run.define_metric(f"{prefix}/*", step_metric="step")
            self._prefixes.add(prefix)
        self._run.log({**metrics, "step": step})

    def close(self) -> None:
        self._run.finish()


# ------------------------------------------------------------------ MLflow

def flat_params(config: dict[str, Any], limit: int) -> dict[str, str]:
    """Dotted keys -> text, cut to `limit` characters (MLflow refuses longer param values)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        text = node if isinstance(node, str) else json.dumps(node)
        out[prefix[:-1]] = text if len(text) <= limit else text[: limit - 3] + "..."

    walk(config, "")
    return out


class MLflowTracker:
    """An MLflow run in the config's experiment, through MlflowClient (no global active run).

    Metrics are buffered and written every few seconds: one write to the SQLite
    store costs ~30 ms on a busy CPU, too much for every step.
    """

    FLUSH_SECONDS = 5.0

    def __init__(self, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run.run_dir / 'mlflow.db').resolve()}"
        self._client = MlflowClient(tracking_uri=uri)
        run_file = run.run_dir / MLFLOW_RUN_FILE
        saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
        resumed = saved.get("tracking_uri") == uri and self._exists(saved.get("run_id"))
        if resumed:
            self.run_id = saved["run_id"]
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.experiment, run.run_dir,
                                          local=not os.environ.get("MLFLOW_TRACKING_URI"))
            self.run_id = self._client.create_run(experiment, run_name=run.run_name).info.run_id
        run_file.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        self._record(run, resumed)
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()

    def _exists(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment(self, name: str, run_dir: Path, local: bool) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # the local store keeps artifacts beside it, not in ./mlruns of whatever the working directory is
        location = (run_dir / "mlartifacts").resolve().as_uri() if local else None
        try:
            return self._client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another run created it meanwhile (a shared tracking server)
            return self._client.get_experiment_by_name(name).experiment_id

    def _record(self, run: RunInfo, resumed: bool) -> None:
        """Params: the flattened config (new keys only: MLflow params cannot change); artifacts: config and
        command of every job, a resumed one's under resumed_at_step_<N>/."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        known = self._client.get_run(self.run_id).data.params if resumed else {}
        params = [Param(k, v) for k, v in flat_params(run.config, MAX_PARAM_VAL_LENGTH).items() if k not in known]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self._client.log_batch(self.run_id, tags=[RunTag("mlflow.note.content", f"`{run.command_line}`")])
        folder = f"resumed_at_step_{run.start_step}/" if resumed else ""
        self._client.log_text(self.run_id, run.config_yaml, f"{folder}config.yaml")
        self._client.log_text(self.run_id, run.command_line + "\n", f"{folder}command.txt")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self._pending.extend(Metric(key, value, ms, step) for key, value in metrics.items())
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=pending[i:i + MAX_METRICS_PER_BATCH])
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._flush()
        self._client.set_terminated(self.run_id)


# ------------------------------------------------------------------ building

BUILDERS: dict[str, Callable[[RunInfo], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}


def build_trackers(names: Sequence[str], run: RunInfo) -> list[Tracker]:
    """The trackers `names` asks for, in that order; on a failure the ones already started are closed."""
    check_log_with(names)
    check_tracker_packages(names)  # again: pretrain() called from Python skips the CLI's validate_launch
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(BUILDERS[name](run))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
