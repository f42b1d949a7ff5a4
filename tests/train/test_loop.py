"""End-to-end runs of the training loop on tiny settings (real photos, real model)."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from harness.config import ConfigError, load_config
from harness.config.loader import config_from_dict
from harness.runtime import Runtime
from harness.train.checkpoint import checkpoint_path, load_checkpoint
from harness.train.loop import build_state, pretrain

TINY = [
    "train.iterations=4", "data.batch_size=4", "data.num_workers=0",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=2",
    "train.tensorboard=true",
]


def tiny_config(tmp_path, *extra):
    return load_config("quickstart", [*TINY, f"train.output_dir={tmp_path}", "train.run_name=run", *extra])


def test_run_writes_metrics_config_checkpoint_and_events(tmp_path):
    cfg = tiny_config(tmp_path, "train.checkpoint_every=2")
    result = pretrain(cfg)
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(result.losses)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx(result.losses)
    assert records[-1]["images_seen"] == 16 and records[0]["images_per_s"] > 0
    assert config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint_path(run_dir, 2).exists() and checkpoint_path(run_dir).exists()
    payload = torch.load(checkpoint_path(run_dir), weights_only=False)
    assert payload["state"]["step"] == 4 and payload["state"]["images_seen"] == 16


def test_checkpoint_restores_the_exact_state(tmp_path):
    cfg = tiny_config(tmp_path)
    pretrain(cfg)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fresh = build_state(cfg, rt)
    load_checkpoint(checkpoint_path(tmp_path / "run"), fresh)
    saved = torch.load(checkpoint_path(tmp_path / "run"), weights_only=False)["state"]
    assert fresh.step == 4
    for name, value in fresh.engine.method.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name], rtol=0, atol=0)
    assert fresh.engine.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()


def test_frozen_prototypes_only_renormalised(tmp_path):
    cfg = tiny_config(tmp_path, "swav.freeze_prototypes_iters=100")
    torch.manual_seed(cfg.train.seed)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    initial = build_state(cfg, rt).engine.method.prototypes.state_dict()
    pretrain(cfg)
    saved = torch.load(checkpoint_path(tmp_path / "run"), weights_only=False)["state"]["model"]
    for key, weight in initial.items():
        torch.testing.assert_close(saved[f"prototypes.{key}"], F.normalize(weight, dim=1))


def test_existing_results_are_never_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=1", "schedule.warmup_iters=0")
    pretrain(cfg)
    final = checkpoint_path(tmp_path / "run")
    before = final.read_bytes()
    with pytest.raises(ConfigError, match="already holds results .*nothing was overwritten"):
        pretrain(cfg)
    assert final.read_bytes() == before


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_run_on_cpu(tmp_path, precision):
    opt_in = ["parallel.allow_slow_cpu_fp16=true"] if precision == "fp16" else []  # the scaler's path, on CPU
    result = pretrain(tiny_config(tmp_path, f"parallel.precision={precision}", "train.iterations=2",
                                  "train.tensorboard=false", *opt_in))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fp16_on_cpu_is_refused_in_one_line_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(tmp_path, "parallel.precision=fp16", "train.device=cpu"))
    message = str(err.value)
    assert "\n" not in message and "11-13x slower" in message
    assert "parallel.precision=fp32" in message and "bf16" in message
    assert not (tmp_path / "run").exists()  # refused before the run folder


def test_user_image_folder(tmp_path):
    from PIL import Image

    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (80, 60), color=(40 * i, 100, 200 - 50 * i)).save(images / f"img{i}.png")
    result = pretrain(tiny_config(tmp_path, f"data.path={tmp_path / 'images'}", "train.iterations=1",
                                  "schedule.warmup_iters=0"))
    assert len(result.losses) == 1
