"""Impossible combinations fail at load time, naming the keys and the fix."""

import shlex

import pytest

from harness.config import ConfigError, RunConfig, list_presets, load_config
from harness.config.validate import CPU_TRYOUT_OVERRIDES, validate, validate_launch
from harness.optim.schedule import build_schedule


@pytest.mark.parametrize("overrides, message", [
    (["swav.crops_for_assign=[0, 6]"], "swav.crops_for_assign=[0, 6] names crop 6 but data.crops give only 6 crops"),
    (["swav.crops_for_assign=[]"], "swav.crops_for_assign is empty"),
    (["swav.crops_for_assign=[1, 1]"], "repeats an index"),
    (["swav.head_dims=[512, 128]"], "swav.head_dims[0]=512 does not match the trunk output width 368 of regnety_200mf"),
    (["model.arch=regnety_8gf"], "set swav.head_dims=[2016, 512, 128]"),
    (["model.arch=regnety_8g"], "did you mean 'regnety_8gf'?"),
    (["model.arch=regnet"], "model.arch=regnet needs model.regnet"),
    (["data.crops=[{size: 64, count: 1, scale: [0.1, 1.0]}]", "swav.crops_for_assign=[0]"], "needs at least 2"),
    (["data.crops.1.scale=[0.5, 0.2]"], "data.crops[1].scale=[0.5, 0.2] must be [low, high]"),
    (["parallel.precision=fp8"], "parallel.precision='fp8' is not one of fp32, fp16, bf16"),
    (["parallel.backend=horovod"], "parallel.backend='horovod' is not one of"),
    (["schedule.warmup_iters=500"], "schedule.warmup_iters=500 is longer than the run (train.iterations=200): "
                                    "set schedule.warmup_iters=20 (a tenth of the run)"),
    (["train.iterations=5"], "set schedule.warmup_iters=0 (no warmup) or train.iterations=20 or more"),
    (["train.iterations=-5"], "train.iterations=-5 must be >= 1"),  # not a warmup complaint
    (["train.iterations=0"], "train.iterations=0 must be >= 1"),
    (["data.extensions=[]"], "data.extensions is empty"),
    (["schedule.name=step"], "schedule.name='step' is not one of cosine, plateau, constant"),
    (["swav.epsilon=0"], "swav.epsilon=0.0 must be > 0"),
    (["train.grad_accum=0"], "train.grad_accum=0 must be >= 1"),
])
def test_impossible_combinations_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", overrides)
    assert message in str(err.value)


def test_every_preset_validates():
    from harness.config import list_presets

    for name in list_presets():
        load_config(name)  # raises on any inconsistency, e.g. head input vs trunk width


# ------------------------------------------------------------ warmup / defaults

def test_readme_seer_example_names_the_warmup_fix():
    with pytest.raises(ConfigError, match=r"schedule\.warmup_iters=6000 .* set schedule\.warmup_iters=100 "):
        load_config("seer_regnety_8gf", ["train.iterations=1000"])
    load_config("seer_regnety_8gf", ["train.iterations=1000", "schedule.warmup_iters=100"])  # README's line


@pytest.mark.parametrize("name", ["cosine", "plateau", "constant"])
def test_zero_warmup_validates_and_starts_at_the_peak(name):
    cfg = load_config("quickstart", ["schedule.warmup_iters=0", f"schedule.name={name}"])
    schedule = build_schedule(cfg.schedule, cfg.data.batch_size, cfg.train.iterations)
    assert schedule(0) == pytest.approx(cfg.schedule.base_lr)  # quickstart: no batch scaling


def test_schema_defaults_are_a_valid_run():
    """A YAML without `inherit:` starts from these, so they must validate on their own."""
    validate(RunConfig())


# ------------------------------------------------------------ validate_launch

@pytest.mark.parametrize("size, world, local, message", [
    (3, 2, None, "parallel.syncbn_group_size=3 does not divide the world size 2: "
                 "set parallel.syncbn_group_size=2 or 0 (all 2 ranks)"),
    (5, 8, None, "set parallel.syncbn_group_size=4 or 0"),
    (48, 32, None, "parallel.syncbn_group_size=48 does not divide the world size 32"),
    (-1, 8, None, "parallel.syncbn_group_size=-1 (one node) needs LOCAL_WORLD_SIZE"),
    (-1, 8, 3, "parallel.syncbn_group_size=-1 (one node: 3 ranks) does not divide the world size 8"),
])
def test_syncbn_groups_must_tile_the_ranks(size, world, local, message):
    cfg = load_config("quickstart", [f"parallel.syncbn_group_size={size}"])
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, world, "cpu", local)
    assert message in str(err.value)


@pytest.mark.parametrize("size, world, local", [
    (0, 7, None), (2, 4, None), (4, 4, None), (3, 1, None),
    (64, 8, None),  # a preset's group on a smaller launch: all ranks, as syncbn.py does
    (-1, 8, 4), (-1, 4, 4), (-1, 1, None),
])
def test_syncbn_groups_that_tile_are_accepted(size, world, local):
    cfg = load_config("quickstart", [f"parallel.syncbn_group_size={size}"])
    validate_launch(cfg, world, "cpu", local)


SEER = [name for name in list_presets() if name.startswith("seer_")]


@pytest.mark.parametrize("name", SEER)
def test_seer_presets_on_cpu_name_the_way_out(name):
    cfg = load_config(name)
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, 1, "cpu")
    message = str(err.value)
    assert "\n" not in message and f"{name} is a GPU preset" in message and "-c quickstart" in message
    assert " ".join(shlex.quote(o) for o in CPU_TRYOUT_OVERRIDES) in message
    validate_launch(cfg, 1, "cuda")


@pytest.mark.parametrize("name", SEER)
def test_seer_cpu_tryout_overrides_validate(name):
    cfg = load_config(name, list(CPU_TRYOUT_OVERRIDES))  # load_config runs validate()
    validate_launch(cfg, 1, "cpu")


def test_seer_preset_runs_on_cpu_when_precision_is_chosen():
    """The escape hatch: a precision other than the preset's fp16 is a deliberate choice."""
    validate_launch(load_config("seer_regnety_8gf", ["parallel.precision=fp32"]), 1, "cpu")
    validate_launch(load_config("seer_regnety_8gf", ["parallel.allow_slow_cpu_fp16=true"]), 1, "cpu")


def _launch_with_data(path) -> None:
    validate_launch(load_config("quickstart", [f"data.path={path}"]), 1, "cpu")


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist: set data.path to a folder of images, a list of paths, an index"),
    ("file", "is a file, read as a list of image paths, but its first entry ('x') is not a file"),
    ("empty", "holds no images (searched recursively for .bmp,.gif,.jpeg,.jpg,.png,.tif,.tiff,.webp)"),
    ("hidden_only", "holds no images"),
])
def test_data_path_without_images_is_refused(tmp_path, layout, message):
    target = tmp_path / "data"
    if layout == "file":
        target.write_bytes(b"x")
    elif layout != "missing":
        target.mkdir()
        (target / "notes.txt").write_text("not an image")
        if layout == "hidden_only":
            (target / ".thumbs").mkdir()
            (target / ".thumbs" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError) as err:
        _launch_with_data(target)
    assert f"data.path='{target}' {message}" in str(err.value)


def test_data_path_with_a_nested_image_and_builtin_photos_pass(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.JPG").write_bytes(b"x")  # decoding is the loader's job, not this check's
    _launch_with_data(tmp_path)
    validate_launch(load_config("quickstart"), 1, "cpu")  # data.path: null, the built-in photos


def test_data_path_is_not_checked_without_data():
    """`profile` feeds synthetic crops; `config show`/`plan` never call validate_launch."""
    cfg = load_config("quickstart", ["data.path=/no/such/folder"])
    validate_launch(cfg, 1, "cpu", check_data=False)
