"""End-to-end runs of the training loop on tiny settings (real photos, real model)."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from harness.config import ConfigError, load_config
from harness.config.loader import config_from_dict
from harness.runtime import Runtime
from harness.checkpoint.layout import complete_checkpoints, read_manifest, read_tensors
from harness.checkpoint.manager import Checkpointer
from harness.config.loader import to_dict
from harness.train.loop import build_state, pretrain

TINY = [
    "train.iterations=4", "data.batch_size=4", "data.num_workers=0",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=2",
    "train.log_with=[tensorboard]",
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
    assert [read_manifest(c)["step"] for c in complete_checkpoints(run_dir)] == [2, 4]
    manifest = read_manifest(run_dir)
    assert manifest["final"] and manifest["images_seen"] == 16 and manifest["config"] == to_dict(cfg)


def test_checkpoint_holds_the_run_state(tmp_path):
    """Checkpointer.load puts a fresh build into exactly the saved state."""
    cfg = tiny_config(tmp_path)
    pretrain(cfg)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fresh = build_state(cfg, rt)
    Checkpointer(tmp_path / "run", cfg, to_dict(cfg), rt).load(complete_checkpoints(tmp_path / "run")[-1], fresh, None)
    saved, _ = read_tensors(tmp_path / "run")
    assert fresh.step == 4 and fresh.images_seen == 16
    live = fresh.engine.method.state_dict()
    assert all(torch.equal(live[k], saved[k]) for k in saved) and "criterion.queue" not in saved
    momentum, _ = read_tensors(tmp_path / "run", "momentum/")
    params = dict(fresh.engine.method.named_parameters())
    assert momentum and all(torch.equal(fresh.engine.optimizer.state[params[k]]["momentum_buffer"], v)
                            for k, v in momentum.items())


def test_frozen_prototypes_only_renormalised(tmp_path):
    cfg = tiny_config(tmp_path, "swav.freeze_prototypes_iters=100")
    torch.manual_seed(cfg.train.seed)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    initial = build_state(cfg, rt).engine.method.prototypes.state_dict()
    pretrain(cfg)
    saved, _ = read_tensors(tmp_path / "run")
    for key, weight in initial.items():
        torch.testing.assert_close(saved[f"prototypes.{key}"], F.normalize(weight, dim=1))
    momentum, _ = read_tensors(tmp_path / "run", "momentum/")
    assert momentum and not [k for k in momentum if k.startswith("prototypes")]  # frozen: never stepped


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_run_on_cpu(tmp_path, precision):
    opt_in = ["parallel.allow_slow_cpu_fp16=true"] if precision == "fp16" else []  # the scaler's path, on CPU
    result = pretrain(tiny_config(tmp_path, f"parallel.precision={precision}", "train.iterations=2",
                                  "train.log_with=[]", *opt_in))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_plain_sgd_without_lars_trains(tmp_path):
    """optim.lars.enabled=false: SGD's update through the same gated step (it crashed before: no `skipped`)."""
    result = pretrain(tiny_config(tmp_path, "optim.lars.enabled=false", "schedule.base_lr=0.05",
                                  "train.iterations=2", "train.log_with=[]"))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


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
    (images / "empty.jpg").write_bytes(b"")
    (images / "page.png").write_bytes(b"<html>404</html>")
    result = pretrain(tiny_config(tmp_path, f"data.path={tmp_path / 'images'}", "train.iterations=2",
                                  "schedule.warmup_iters=0"))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data_skipped_empty"] >= 1 and last["data_skipped_not_image"] >= 1  # 8 positions cover all 5
