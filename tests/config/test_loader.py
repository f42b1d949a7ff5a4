"""Loading presets, overrides and the errors a user sees for bad input."""

from pathlib import Path

import pytest

from harness.config import ConfigError, RegNetSpec, RunConfig, list_presets, load_config, to_yaml
from harness.config.loader import config_from_dict

import yaml

SEER_PRESETS = [f"seer_regnety_{n}gf" for n in (8, 16, 32, 64, 128, 256)] + ["seer_10b"]


def test_all_required_presets_exist():
    presets = list_presets()
    for name in SEER_PRESETS + ["quickstart"]:
        assert name in presets
    assert not any(p.startswith("_") for p in presets)


def test_seer_256gf_carries_the_papers_recipe():
    cfg = load_config("seer_regnety_256gf")
    assert cfg.model.arch == "regnety_256gf"
    assert [(c.size, c.count, c.scale) for c in cfg.data.crops] == [(224, 2, [0.14, 1.0]), (96, 4, [0.05, 0.14])]
    assert cfg.swav.head_dims == [10444, 8192, 8192, 256]
    assert cfg.swav.num_prototypes == [16000]
    assert (cfg.swav.temperature, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations) == (0.1, 0.05, 10)
    assert cfg.swav.crops_for_assign == [0, 1] and not cfg.swav.head_batchnorm
    assert cfg.optim.lars.enabled and cfg.optim.lars.trust_coefficient == 0.001 and cfg.optim.lars.eps == 1e-8
    assert not cfg.optim.lars.clip and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-5
    s = cfg.schedule
    assert (s.name, s.start_lr, s.warmup_iters, s.base_lr, s.base_batch) == ("cosine", 0.15, 8000, 0.3, 256)
    global_batch = cfg.data.batch_size * cfg.world_size
    assert global_batch == 8192
    assert s.base_lr * global_batch / s.base_batch == pytest.approx(9.6)
    assert s.final_lr_ratio * 9.6 == pytest.approx(0.0096)
    assert cfg.parallel.precision == "fp16" and cfg.parallel.syncbn_group_size == 64
    assert cfg.parallel.activation_checkpointing and cfg.train.iterations == 122000


def test_ablation_presets_follow_appendix():
    heads = {8: 2016, 16: 3024, 32: 3712, 64: 4920, 128: 7392}
    for gf, width in heads.items():
        cfg = load_config(f"seer_regnety_{gf}gf")
        hidden = 4096 if gf <= 32 else 8192
        assert cfg.swav.head_dims == [width, hidden, hidden, 256]
        assert cfg.data.batch_size * cfg.world_size == 8192 and cfg.world_size == 256
        assert cfg.swav.sinkhorn_iterations == 5 and cfg.parallel.syncbn_group_size == 32
        assert cfg.optim.weight_decay == 1e-6
        assert (cfg.schedule.start_lr, cfg.schedule.warmup_iters) == (0.3, 6000)


def test_seer_10b_matches_vissl_config():
    cfg = load_config("seer_10b")
    assert cfg.world_size == 496 and cfg.data.batch_size == 16
    assert [(c.size, c.count) for c in cfg.data.crops] == [(160, 2), (96, 4)]
    assert cfg.swav.head_dims == [28280, 8192, 8192, 256] and cfg.swav.epsilon == 0.03
    assert cfg.parallel.backend == "fairscale" and cfg.parallel.wrap_min_params == 100_000_000
    assert cfg.parallel.stage_checkpoints == [[2], [7], [9, 17], []]


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config("quickstart", ["optim.weight_decay=1e-5", "data.crops.0.size=48",
                                     "swav.num_prototypes=[32, 16]", "data.path=/tmp/x", "train.run_name=null"])
    assert cfg.optim.weight_decay == 1e-5 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.crops[0].size == 48 and cfg.swav.num_prototypes == [32, 16]
    assert cfg.data.path == "/tmp/x" and cfg.train.run_name is None


def test_custom_regnet_from_overrides():
    cfg = load_config("quickstart", ["model.arch=regnet", "model.regnet.depth=13", "model.regnet.w0=24",
                                     "model.regnet.wa=36.44", "model.regnet.wm=2.49",
                                     "model.regnet.group_width=8"])
    assert cfg.model.regnet == RegNetSpec(depth=13, w0=24, wa=36.44, wm=2.49, group_width=8)


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decy=1", "unknown config key 'optim.weight_decy'; did you mean 'optim.weight_decay'?"),
    ("swav.temprature=0.2", "did you mean 'swav.temperature'?"),
    ("trian.iterations=3", "unknown config key 'trian'; did you mean 'train'?"),
    ("data.batch_size=lots", "data.batch_size: expected an integer, got 'lots'"),
    ("optim.lars.enabled=1", "optim.lars.enabled: expected true or false, got 1"),
    ("data.crops.0.scale=[0.1, x]", "data.crops[0].scale[1]: expected a number, got 'x'"),
    ("data.crops.7.size=3", "data.crops.7: index out of range"),
    ("justakey", "must look like key.path=value"),
])
def test_bad_overrides_fail_with_the_key_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert message in str(err.value)


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'seer_regnety_8gf'"):
        load_config("seer_regnety_8g")


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("seer_10b")
    again = config_from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_yaml_file_with_inherit(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: quickstart\nname: mine\ntrain: {iterations: 70}\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.train.iterations == 70
    assert cfg.model.arch == load_config("quickstart").model.arch


def test_yaml_file_without_inherit_starts_from_the_schema_defaults(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\ntrain: {iterations: 5}\n")
    cfg = load_config(str(path))  # validates: the defaults are a runnable config
    defaults = RunConfig()
    assert cfg.name == "plain" and cfg.train.iterations == 5
    assert (cfg.model, cfg.swav, cfg.data) == (defaults.model, defaults.swav, defaults.data)


def test_inherit_reads_a_relative_yaml_beside_the_inheriting_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("inherit: quickstart\ntrain: {iterations: 40}\n")
    (tmp_path / "configs" / "child.yaml").write_text("inherit: base.yaml\nname: child\n")
    cfg = load_config(str(tmp_path / "configs" / "child.yaml"))  # the working directory is elsewhere
    assert cfg.name == "child" and cfg.train.iterations == 40 and cfg.model.arch == "regnety_200mf"


def test_readme_example_yaml_loads(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    path = tmp_path / "my.yaml"
    path.write_text(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = load_config(str(path))
    assert cfg.data.batch_size == 64 and cfg.schedule.warmup_iters == 200 and cfg.data.crops[0].size == 64
