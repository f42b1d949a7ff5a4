"""`harness eval knn|linear|finetune` end to end on a tiny run, its exported trunk and a VISSL-format trunk.

One 2-step single-process pretraining is shared by the module, evaluated on
a tiny labelled scene set (10 classes, 4 train / 2 val images each, 32 px).
The exported file and the VISSL-named state dict hold the same trunk, so
they must give the same features (read from the feature cache) and the same
accuracy as the run folder; the random-init baseline must be the trunk a
run with the same seed starts from. Each command leaves a JSON record with
the command line, the resolved config and the checkpoint it read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.config import load_config
from tests.checkpoint.test_export import TINY, nested

EVAL = ["eval.crop=32", "eval.resize=37", "eval.batch_size=16", "eval.num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from harness.eval.scenes import write_scenes
    from harness.train.loop import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval")
    cfg = load_config("quickstart", [*TINY, f"train.output_dir={out}"])
    pretrain(cfg)
    scenes = write_scenes(out / "scenes", per_class_train=4, per_class_val=2, size=32)
    yield {"out": out, "run": out / "run", "cfg": cfg, "scenes": scenes}
    torch.set_num_threads(threads)


def evaluate(run: dict, kind: str, source, *extra: str) -> dict:
    out = run["out"] / "results" / kind
    before = set(out.glob(f"{kind}*.json")) if out.exists() else set()
    argv = ["eval", kind, str(source), "--data", str(run["scenes"]), "--out", str(out),
            f"train.output_dir={run['out']}", *EVAL, *extra]
    assert main(argv) == 0
    (path,) = set(out.glob(f"{kind}*.json")) - before
    return {**json.loads(path.read_text()), "path": str(path)}


def cached(record: dict) -> dict[str, torch.Tensor]:
    """The val features the command extracted (the newest file of its cache)."""
    folder = Path(record["path"]).parent / "features"
    blobs = [torch.load(p, weights_only=True) for p in folder.glob("features-*.pt")]
    return {b["key"]["source"]["kind"] + ":" + b["key"]["set"]: b["taps"]["pool"] for b in blobs}


def test_knn_of_run_export_and_vissl_trunk_agree_and_record_their_origin(run, tmp_path, capsys):
    exported = tmp_path / "trunk.safetensors"
    assert main(["export", str(run["run"]), "--out", str(exported)]) == 0
    from harness.checkpoint.export import read_checkpoint_trunk

    state, _, _, manifest = read_checkpoint_trunk(run["run"])
    vissl = tmp_path / "seer_like.torch"
    torch.save(nested("classy", state), vissl)

    sources = {"run": run["run"], "export": exported, "vissl": vissl}
    records = {name: evaluate(run, "knn", src, "eval.knn.k=5") for name, src in sources.items()}
    printed = capsys.readouterr().out
    assert "k-NN (k=5, T=0.07)" in printed and "top-1" in printed
    kinds = {name: r["checkpoint"]["kind"] for name, r in records.items()}
    assert kinds == {"run": "harness-checkpoint", "export": "export", "vissl": "vissl"}
    assert records["run"]["checkpoint"]["step"] == manifest["step"] == 2
    for name, r in records.items():
        assert r["results"]["top1"] == records["run"]["results"]["top1"]
        assert r["results"]["top5"] == records["run"]["results"]["top5"]
        assert r["command"].startswith(f"harness eval knn {sources[name]} --data ")
        assert r["config"]["eval"]["knn"]["k"] == 5 and r["config"]["eval"]["crop"] == 32
        assert r["data"]["classes"] == 10 and r["data"]["train_images"] == 40 and r["data"]["val_images"] == 20
    feats = {}
    for r in records.values():
        feats.update(cached(r))
    val = [v for k, v in feats.items() if v.shape[0] == 20]
    assert len(val) == 3
    for v in val[1:]:
        torch.testing.assert_close(v, val[0], rtol=0, atol=0)


def test_random_init_is_the_trunk_a_run_starts_from(run):
    from harness.eval.checkpoint import load_trunk
    from harness.runtime import Runtime
    from harness.train.loop import build_state

    cfg = run["cfg"]
    fresh = load_trunk(run["run"], random_init=True, seed=cfg.train.seed)
    assert fresh.source["kind"] == "random-init"
    state = build_state(cfg, Runtime(0, 1, 0, torch.device("cpu")))
    start = state.engine.method.trunk.state_dict()
    for key, value in fresh.trunk.state_dict().items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)
    trained = load_trunk(run["run"]).trunk.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in fresh.trunk.state_dict().items())
    record = evaluate(run, "knn", run["run"], "--random-init")
    assert record["random_init"] and Path(record["path"]).name.startswith("knn-random-")


def test_random_init_with_recomputed_batchnorm_is_recorded_and_cached_apart(run, capsys):
    plain = evaluate(run, "knn", run["run"], "--random-init")
    capsys.readouterr()
    recomputed = evaluate(run, "knn", run["run"], "--random-init", "eval.recompute_bn=true")
    assert "(random-init, BatchNorm statistics recomputed)" in capsys.readouterr().out
    assert recomputed["checkpoint"]["bn_statistics"] == f"recomputed on {run['scenes'] / 'train'}"
    assert "bn_statistics" not in plain["checkpoint"] and not recomputed["results"]["features_cached"]
    folder = Path(recomputed["path"]).parent / "features"
    sources = [torch.load(p, weights_only=True)["key"]["source"] for p in folder.glob("features-*.pt")]
    random = [src for src in sources if src["kind"] == "random-init"]
    assert len(random) == 4  # train and val, with and without the recomputed statistics: four cache entries
    assert sum("bn_statistics" in src for src in random) == 2
    again = evaluate(run, "knn", run["run"], "--random-init", "eval.recompute_bn=true")
    assert again["results"]["features_cached"] and again["results"] == recomputed["results"] | {
        "features_cached": True}


def test_linear_probe_sweeps_weight_decays_on_cached_features(run, capsys):
    extra = ["eval.linear.epochs=3", "eval.linear.batch_size=16", "eval.linear.taps=[res4,pool]",
             "eval.linear.weight_decays=[1e-4,1e-2]"]
    first = evaluate(run, "linear", run["run"], *extra)
    again = evaluate(run, "linear", run["run"], *extra)
    assert not first["results"]["features_cached"] and again["results"]["features_cached"]
    for tap in ("res4", "pool"):
        r = first["results"][tap]
        assert set(r["per_weight_decay"]) == {"0.0001", "0.01"}
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r == again["results"][tap]
    assert "linear probe" in capsys.readouterr().out


def test_finetune_on_a_low_shot_subset(run):
    record = evaluate(run, "finetune", run["run"], "--subset", "2/class", "eval.finetune.epochs=2",
                      "eval.finetune.batch_size=10")
    r = record["results"]
    assert record["data"]["train_images"] == 20 and record["data"]["subset"] == "2/class"
    assert r["steps"] == 2 * 2 and r["epochs"] == 2 and 0 <= r["top1"] <= r["top5"] <= 100
    assert r["loss_first"] == r["loss_first"]  # a number, not NaN


@pytest.mark.parametrize("argv, expected", [
    (["eval", "knn", "/no/such/run"], "no such file or folder"),
    (["eval", "linear", "/no/such/run", "eval.linear.taps=[res9]"], "eval.linear.taps"),
    (["eval", "finetune", "/no/such/run", "--subset", "lots"], "lots"),
    (["eval", "knn", "/no/such/run", "eval.knn.k=0"], "eval.knn"),
    (["eval", "finetune", "/no/such/run", "eval.recompute_bn=true"], "eval.recompute_bn=true applies to knn and"),
    (["eval", "knn", "/no/such/run", "eval.builtin=photos"], "eval.builtin='photos' is not a built-in labelled set"),
])
def test_bad_input_is_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
