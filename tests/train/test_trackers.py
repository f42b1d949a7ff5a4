"""Experiment trackers (`train.log_with`): what a run leaves in TensorBoard, MLflow and W&B, read back
with each tracker's own reader, offline.

One tiny quickstart run (3 steps, k-NN of the live trunk every 2 steps and at the
end: `train.eval_every`) logs to all three; a second job on the same
run folder (a MetricsLogger as a job resumed from step 2 builds it) logs a
new step-3 loss and eval metrics. Everything is read back after each job:
TensorBoard through its EventAccumulator, MLflow through MlflowClient, W&B
from the offline run's .wandb file (a LevelDB-style log of protobuf
`Record`s, parsed here with wandb's own proto classes: wandb 0.31 has no
Python reader, its Go core writes the file). The losses and k-NN accuracies
must equal metrics.jsonl's; the config and the command line must be in each.
"""

from __future__ import annotations

import json
import shlex
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.config import load_config
from harness.config.loader import ConfigError, to_dict
from harness.config.validate import validate_launch
from harness.train import trackers
from harness.train.metrics import MetricsLogger

# MLflow 3.17's SQLite store on SQLAlchemy 2.1 (harmless, MLflow's to update)
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

ALL = ["tensorboard", "mlflow", "wandb"]
TINY = ["data.batch_size=4", "data.num_workers=0", "train.iterations=3", "train.device=cpu",
        "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
        "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=1",
        f"train.log_with=[{','.join(ALL)}]", "train.run_name=run", "train.eval_every=2", "eval.crop=32",
        "eval.resize=37", "eval.num_workers=0", "eval.knn.k=3"]
RESUMED_COMMAND = ["harness", "pretrain", "train.iterations=4", "(resumed)"]
WANDB_DIRS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


# ------------------------------------------------------------------ readers

def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB log
    blocks of 32 KiB, each record a 7-byte header (crc32, length, type) and its data, split FIRST/MIDDLE/LAST
    across blocks (https://github.com/google/leveldb/blob/main/doc/log_format.md)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header, pos, chunk, out = 32768, 7, 7, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's trailer: too short for a header
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def read_wandb(path: Path) -> dict:
    history, config, run_id = [], {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return {"id": run_id, "history": history, "config": config}


def read_back(run_dir: Path) -> dict:
    """What each tracker holds now, through its own reader."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    texts = {tag.split("/")[0]: [(e.step, e.tensor_proto.string_val[0].decode()) for e in tb.Tensors(tag)]
             for tag in tb.Tags()["tensors"]}
    saved = json.loads((run_dir / trackers.MLFLOW_RUN_FILE).read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    return {
        "jsonl": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        "tb": {tag: [(e.step, e.value) for e in tb.Scalars(tag)] for tag in tb.Tags()["scalars"]} | {"text": texts},
        "mlflow": {"run": run, "artifacts": {p.relative_to(artifacts).as_posix(): p.read_text()
                                              for p in artifacts.rglob("*") if p.is_file()},
                   **{key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                      for key in ("train/loss", "eval/knn_top1")}},
        "wandb": [read_wandb(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))],
        "wandb_id": (run_dir / trackers.WANDB_ID_FILE).read_text().strip(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from harness.train.loop import pretrain

    tmp = tmp_path_factory.mktemp("trackers")
    cwd = tmp / "cwd"
    cwd.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine: intra-op threads spin against other work
    with pytest.MonkeyPatch.context() as mp:
        for name in WANDB_DIRS:
            mp.setenv(name, str(tmp / "wandb-home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        mp.chdir(cwd)  # anything a tracker wrote to the working directory would land here
        from harness.eval.scenes import write_scenes

        scenes = write_scenes(tmp / "scenes", per_class_train=2, per_class_val=1, size=32)
        command = ["harness", "pretrain", "-c", "quickstart", *TINY, f"train.output_dir={tmp}", f"eval.data={scenes}"]
        mp.setattr(sys, "argv", command)
        cfg = load_config("quickstart", command[4:])
        pretrain(cfg)
        run_dir = tmp / "run"
        first = read_back(run_dir)
        # a job resumed from a step-2 checkpoint: it logs step 3 again, and eval metrics
        logger = MetricsLogger(run_dir, True, ALL, to_dict(cfg), RESUMED_COMMAND, "run", start_step=2)
        logger.log(3, {"loss": 123.0})
        logger.log(3, {"knn_top1": 42.5, "knn_top5": 90.0}, prefix="eval")
        logger.close()
        second = read_back(run_dir)
        import wandb

        wandb.teardown()  # its service process ends with this test module, not with pytest
    torch.set_num_threads(threads)
    return {"cfg": cfg, "command": command, "first": first, "second": second, "cwd": cwd, "run_dir": run_dir}


# ------------------------------------------------------------------ a run, read back

def test_loss_in_every_tracker_equals_metrics_jsonl(runs):
    first = runs["first"]
    losses = [(r["step"], r["loss"]) for r in first["jsonl"] if "loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3]
    assert first["mlflow"]["train/loss"] == losses  # float64 in MLflow's store: exact
    assert first["tb"]["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]  # float32 events
    (wb,) = first["wandb"]
    assert [(row["step"], row["train/loss"]) for row in wb["history"] if "train/loss" in row] == losses
    assert {"train/lr", "train/images_per_s"} <= set(wb["history"][0]) & set(first["tb"])
    assert list(runs["cwd"].iterdir()) == []  # nothing outside the run folder (and the redirected wandb home)


def test_knn_accuracy_of_eval_every_in_every_tracker(runs):
    """`train.eval_every=2` on a 3-step run: k-NN of the live trunk after steps 2 and 3 (the last),
    beside the loss in metrics.jsonl and in all three trackers, offline."""
    first = runs["first"]
    knn = [(r["step"], r["eval/knn_top1"]) for r in first["jsonl"] if "eval/knn_top1" in r]
    assert [step for step, _ in knn] == [2, 3] and all(0 <= v <= 100 for _, v in knn)
    assert all("eval/knn_top5" in r for r in first["jsonl"] if "eval/knn_top1" in r)
    assert first["mlflow"]["eval/knn_top1"] == knn
    assert first["tb"]["eval/knn_top1"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in knn]
    (wb,) = first["wandb"]
    assert [(row["step"], row["eval/knn_top1"]) for row in wb["history"] if "eval/knn_top1" in row] == knn


def test_config_and_command_recorded_in_every_tracker(runs):
    first, config = runs["first"], to_dict(runs["cfg"])
    command = shlex.join(runs["command"])
    (wb,) = first["wandb"]
    assert wb["id"] == first["wandb_id"]
    assert {k: wb["config"][k] for k in config} == config and wb["config"]["command"] == command
    params = first["mlflow"]["run"].data.params
    assert params["model.arch"] == "regnety_200mf" and params["train.log_with"] == json.dumps(ALL)
    assert params["swav.head_dims"] == "[368, 32, 16]" and params["train.run_name"] == "run"
    assert yaml.safe_load(first["mlflow"]["artifacts"]["config.yaml"]) == config
    assert first["mlflow"]["artifacts"]["command.txt"] == command + "\n"
    assert first["mlflow"]["run"].data.tags["mlflow.note.content"] == f"`{command}`"
    assert first["mlflow"]["run"].info.status == "FINISHED"
    (step, text), = first["tb"]["text"]["config"]
    assert step == 0 and yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```")) == config
    assert first["tb"]["text"]["command"] == [(0, f"`{command}`")]


def test_resumed_job_continues_the_same_tracker_runs_and_logs_eval(runs):
    first, second = runs["first"], runs["second"]
    n = len(first["jsonl"])
    assert second["jsonl"][:n] == first["jsonl"]
    assert [{k: v for k, v in r.items() if k != "time"} for r in second["jsonl"][n:]] == [
        {"step": 3, "loss": 123.0}, {"step": 3, "eval/knn_top1": 42.5, "eval/knn_top5": 90.0}]
    old = first["mlflow"]["train/loss"]
    # MLflow: the same run; it keeps every value (the step-3 loss twice)
    assert second["mlflow"]["run"].info.run_id == first["mlflow"]["run"].info.run_id
    assert second["mlflow"]["train/loss"] == old + [(3, 123.0)]
    assert second["mlflow"]["eval/knn_top1"] == first["mlflow"]["eval/knn_top1"] + [(3, 42.5)]
    assert second["mlflow"]["artifacts"]["resumed_at_step_2/command.txt"] == shlex.join(RESUMED_COMMAND) + "\n"
    assert second["mlflow"]["run"].info.status == "FINISHED"
    # TensorBoard: the resumed job's purge_step hides the old job's step 3
    assert second["tb"]["train/loss"] == [*first["tb"]["train/loss"][:2], (3, 123.0)]
    assert second["tb"]["eval/knn_top1"] == [*first["tb"]["eval/knn_top1"][:1], (3, 42.5)]
    assert second["tb"]["text"]["command"] == [(0, f"`{shlex.join(runs['command'])}`"),
                                              (2, f"`{shlex.join(RESUMED_COMMAND)}`")]
    # W&B: a second offline folder of the same run id, eval on the same `step` axis
    assert [wb["id"] for wb in second["wandb"]] == [first["wandb_id"]] * 2
    rows = second["wandb"][1]["history"]
    assert [(r["step"], r.get("train/loss"), r.get("eval/knn_top1")) for r in rows] == [(3, 123.0, None),
                                                                                        (3, None, 42.5)]
    assert second["wandb"][1]["config"]["command"] == shlex.join(RESUMED_COMMAND)


# ------------------------------------------------------------------ checks and units

@pytest.mark.parametrize("override, expected", [
    ("train.log_with=[tensorbord]", "train.log_with names 'tensorbord', which is not one of tensorboard, wandb"),
    ("train.log_with=[wandb,mlflow,wandb]", "train.log_with names wandb twice"),
    ("train.tensorboard=false", "config key 'train.tensorboard' was replaced: use train.log_with=[tensorboard]"),
])
def test_bad_log_with_is_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_tracker_package_is_one_line_before_the_run(monkeypatch):
    real = trackers.required_modules
    monkeypatch.setattr(trackers, "required_modules", lambda name: (
        (("harness_no_such_module",), real(name)[1]) if name == "wandb" else real(name)))
    cfg = load_config("quickstart", ["train.log_with=[tensorboard,wandb]"])
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, 1, "cpu", check_data=False)
    message = str(err.value)
    assert message.startswith("train.log_with names wandb but harness_no_such_module is not installed: "
                              "`pip install wandb`") and "\n" not in message


def test_install_lines_name_what_is_missing():
    def find_spec(name):
        return None if name in ("wandb", "sqlalchemy") else object()

    with pytest.raises(ConfigError, match="wandb is not installed: `pip install wandb`"):
        trackers.check_tracker_packages(["tensorboard", "wandb"], find_spec)
    assert trackers.required_modules("mlflow", {}) == (("mlflow", "sqlalchemy", "alembic"),
                                                       "pip install mlflow-skinny sqlalchemy alembic")
    assert trackers.required_modules("mlflow", {"MLFLOW_TRACKING_URI": "http://server:5000"}) == (
        ("mlflow",), "pip install mlflow-skinny")  # a tracking server: no local SQLite store
    trackers.check_tracker_packages(["tensorboard", "mlflow", "wandb"])  # all installed here


def test_wandb_mode_is_offline_without_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login a password b\n")
    assert trackers.wandb_mode({"NETRC": str(netrc)}) == "offline"
    assert trackers.wandb_mode({"NETRC": str(netrc), "WANDB_MODE": "online"}) is None
    assert trackers.wandb_mode({"NETRC": str(netrc), "WANDB_API_KEY": "k" * 40}) is None
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")  # as `wandb login` writes it
    assert trackers.wandb_mode({"NETRC": str(netrc)}) is None
    assert trackers.wandb_mode({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.corp.example"}) == "offline"


def test_mlflow_params_flattened_and_cut_to_the_limit():
    params = trackers.flat_params({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": "x" * 50, "f": {}}, limit=10)
    assert params == {"a.b": "1", "a.c": "null", "a.d": "[1, 2]", "e": "xxxxxxx...", "f": "{}"}


class _Broken:
    closed = 0

    def __init__(self, run: trackers.RunInfo) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise ConnectionError("tracking server unreachable")

    def close(self) -> None:
        _Broken.closed += 1


def test_a_failing_tracker_is_dropped_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.BUILDERS, "wandb", _Broken)
    monkeypatch.setattr(trackers, "check_tracker_packages", lambda names: None)
    logger = MetricsLogger(tmp_path, True, ["wandb"], {"name": "t"}, ["cmd"], "run")
    logger.log(1, {"loss": 2.0})
    logger.log(2, {"loss": 1.0})
    logger.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2.0, 1.0]
    assert capsys.readouterr().err.count("_Broken failed (ConnectionError: tracking server unreachable)") == 1
    assert _Broken.closed == 1


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, False, ALL, {"name": "t"}, ["cmd"], "run")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []
