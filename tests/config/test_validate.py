"""Impossible combinations fail at load time, naming the keys and the fix."""

import pytest

from harness.config import ConfigError, load_config


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
    (["schedule.warmup_iters=500"], "schedule.warmup_iters=500 exceeds train.iterations=200"),
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
