"""Linear probe on cached features: scikit-learn's LogisticRegression as the reference, VISSL's pooling dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from harness.config.loader import ConfigError
from harness.eval.linear import VISSL_GRIDS, LinearConfig, LinearHead, pool_tap, train_linear
from harness.models.regnet import regnet_layout
from harness.models.zoo import aligned_spec, preset_spec

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, DIM, N_TRAIN = 4, 32, 400


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 overlapping Gaussian classes in 32-d, 400 train / 200 test, seed 0: separable-ish
    (logistic regression: 100% train, 98.5% test at C=1)."""
    rng = np.random.RandomState(0)
    centres = rng.normal(size=(CLASSES, DIM)) * 0.6

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.randint(0, CLASSES, size=n)
        return torch.from_numpy((centres[y] + rng.normal(size=(n, DIM))).astype(np.float32)), torch.from_numpy(y)

    return (*draw(N_TRAIN), *draw(200))


def _predict(result, cfg: LinearConfig, x: torch.Tensor) -> torch.Tensor:
    head = LinearHead(x.shape[1], CLASSES, cfg.batchnorm)
    head.load_state_dict(result.head_state)
    with torch.no_grad():
        return head.eval()(x)


def test_bn_probe_agrees_with_logistic_regression(blobs) -> None:
    """VISSL's head and optimiser (BN + linear, SGD nesterov, wd 5e-4, /10 at 8/16/24 of 28) against
    multinomial logistic regression with the same L2 strength (C = 1 / (wd * n)): top-1 within 2
    points, the same prediction on >= 95% of test points.

    280 epochs, not 28: VISSL's 28 epochs are 56 steps on 400 points (LR 0.01 per 256), which leaves
    this head under-trained (96.0% vs 98.5%); the fractions keep VISSL's decay points.
    """
    x_tr, y_tr, x_te, y_te = blobs
    cfg = LinearConfig(epochs=280)
    result = train_linear(x_tr, y_tr, x_te, y_te, CLASSES, cfg)
    ref = LogisticRegression(C=1.0 / (cfg.weight_decays[0] * N_TRAIN), max_iter=5000).fit(x_tr.numpy(), y_tr.numpy())
    ref_pred = torch.from_numpy(ref.predict(x_te.numpy()))
    ref_top1 = 100.0 * (ref_pred == y_te).float().mean().item()
    assert abs(result.best_top1 - ref_top1) <= 2.0, (result.best_top1, ref_top1)
    agree = (_predict(result, cfg, x_te).argmax(1) == ref_pred).float().mean().item()
    assert agree >= 0.95, agree
    assert result.best_top5 == 100.0 and result.lr == pytest.approx(0.01)


def test_plain_head_reaches_the_logistic_regression_minimiser(blobs) -> None:
    """Without BatchNorm the probe minimises mean CE + wd/2 * (|W|^2 + |b|^2): scikit-learn's
    L2 multinomial objective with C = 1 / (wd * n) and the bias as a penalised weight on a
    constant-1 feature. Strictly convex, so one minimiser: full-batch SGD must land on it
    (weights, bias and test probabilities within 1e-4). wd = 1e-3 (C = 2.5); smaller wd is the
    same objective, only slower to converge on nearly separable data.
    """
    x_tr, y_tr, x_te, y_te = blobs
    wd = 1e-3
    cfg = LinearConfig(
        batchnorm=False, batch_size=N_TRAIN, epochs=300, base_lr=2.0, milestones=(), weight_decays=[wd]
    )
    result = train_linear(x_tr, y_tr, x_te, y_te, CLASSES, cfg)
    ones = lambda x: np.hstack([x.numpy().astype(np.float64), np.ones((len(x), 1))])  # noqa: E731
    ref = LogisticRegression(C=1.0 / (wd * N_TRAIN), fit_intercept=False, tol=1e-10, max_iter=10000)
    ref.fit(ones(x_tr), y_tr.numpy())
    w = result.head_state["linear.weight"].double().numpy()
    b = result.head_state["linear.bias"].double().numpy()
    np.testing.assert_allclose(w, ref.coef_[:, :DIM], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b, ref.coef_[:, DIM], rtol=0, atol=1e-4)
    proba = torch.softmax(_predict(result, cfg, x_te).double(), 1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(ones(x_te)), rtol=0, atol=1e-4)


def test_sweep_equals_separate_runs_and_picks_the_best(blobs) -> None:
    """One entry per weight decay; each head of a sweep is bit-identical to training it alone
    (same init, same batches, independent gradients); the best is the highest val top-1."""
    x_tr, y_tr, x_te, y_te = blobs
    wds = [1e-4, 5e-4, 0.3]
    sweep = train_linear(x_tr, y_tr, x_te, y_te, CLASSES, LinearConfig(weight_decays=wds))
    assert list(sweep.per_wd) == wds
    assert all(set(v) == {"top1", "top5", "train_loss"} for v in sweep.per_wd.values())
    top1 = {wd: v["top1"] for wd, v in sweep.per_wd.items()}
    assert len(set(top1.values())) > 1  # the pick is not a tie-break
    assert len({v["train_loss"] for v in sweep.per_wd.values()}) == len(wds)  # the heads differ
    assert sweep.best_wd == max(wds, key=lambda wd: top1[wd]) and sweep.best_top1 == max(top1.values())
    alone = train_linear(x_tr, y_tr, x_te, y_te, CLASSES, LinearConfig(weight_decays=[sweep.best_wd]))
    assert alone.per_wd[sweep.best_wd] == sweep.per_wd[sweep.best_wd]
    for key, value in alone.head_state.items():
        torch.testing.assert_close(sweep.head_state[key], value, rtol=0, atol=0, msg=key)
    assert set(sweep.summary()) == {"per_wd", "best_wd", "best_top1", "best_top5", "lr"}


def test_seed_determines_the_result(blobs) -> None:
    x_tr, y_tr, x_te, y_te = blobs
    before = torch.get_rng_state()
    runs = [train_linear(x_tr, y_tr, x_te, y_te, CLASSES, LinearConfig(seed=s, epochs=4)) for s in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    for key in runs[0].head_state:
        torch.testing.assert_close(runs[1].head_state[key], runs[0].head_state[key], rtol=0, atol=0)
    assert not torch.equal(runs[2].head_state["linear.weight"], runs[0].head_state["linear.weight"])


VISSL_DIMS = {  # (model config, tap): (channels, eval_mlp dims[0]) from VISSL's imagenet1k/models/*.yaml
    ("regnet8Gf", "res4"): (896, 8064), ("regnet8Gf", "res5"): (2016, 12096),
    ("regnet16Gf", "res4"): (1232, 11088), ("regnet16Gf", "res5"): (3024, 12096),
    ("regnet32Gf", "res4"): (1392, 9744), ("regnet32Gf", "res5"): (3712, 11136),
    ("regnet64Gf_3", "res4"): (1968, 9840), ("regnet64Gf_3", "res5"): (4920, 9840),
    ("regnet128Gf", "res4"): (2904, 8712), ("regnet128Gf", "res5"): (7392, 14784),
    ("regnet256Gf_1", "res4"): (4103, 8206), ("regnet256Gf_1", "res5"): (10444, 20888),
    ("regnet10B", "res4"): (11110, 22220), ("regnet10B", "res5"): (28280, 56560),
}


@pytest.mark.parametrize("model,tap", list(VISSL_DIMS))
def test_pool_tap_gives_vissl_dims(model: str, tap: str) -> None:
    """A 224 px input's res4 (14x14) / res5 (7x7) map pools to the width of VISSL's eval_mlp."""
    channels, dims = VISSL_DIMS[model, tap]
    size = 14 if tap == "res4" else 7
    x = torch.randn(2, channels, size, size)
    out = pool_tap(x, tap)
    assert out.shape == (2, dims)
    grid = VISSL_GRIDS[tap][channels]
    torch.testing.assert_close(out, torch.nn.AdaptiveAvgPool2d(grid)(x).flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["regnety_8gf", "regnety_16gf", "regnety_32gf", "regnety_64gf",
                                  "regnety_128gf", "regnety_256gf", "seer_10b"])
def test_vissl_grids_cover_the_seer_presets(arch: str) -> None:
    for spec in (preset_spec(arch), aligned_spec(arch)):
        res4, res5 = regnet_layout(spec).widths[2:]
        assert res4 in VISSL_GRIDS["res4"] and res5 in VISSL_GRIDS["res5"], (arch, res4, res5)


def test_pool_tap_defaults_and_pass_through() -> None:
    x = torch.randn(3, 152, 4, 4)  # regnety_200mf res4 at 64 px: no VISSL grid -> ResNet-50's 3x3
    assert pool_tap(x, "res4").shape == (3, 152 * 9)
    assert pool_tap(torch.randn(3, 368, 2, 2), "res5").shape == (3, 368 * 4)
    assert pool_tap(torch.randn(3, 24, 3, 3), "res2").shape == (3, 24 * 9)  # 6x6 cut to the 3x3 map
    assert pool_tap(x, "res4", grid=(1, 2)).shape == (3, 304)
    pooled = torch.randn(3, 368)
    assert pool_tap(pooled, "pool") is pooled
    assert pool_tap(pooled[:, :, None, None], "pool").shape == (3, 368)


def test_bad_taps_and_settings_raise_clearly() -> None:
    with pytest.raises(ConfigError, match=r"unknown feature tap 'res6'; valid taps: res2, res3, res4, res5, pool"):
        pool_tap(torch.randn(1, 8, 4, 4), "res6")
    with pytest.raises(ValueError, match=r"tap 'res4' expects an \[N, C, H, W\] map"):
        pool_tap(torch.randn(1, 8), "res4")
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    with pytest.raises(ConfigError, match="milestones are increasing fractions"):
        train_linear(x, y, x, y, 2, LinearConfig(milestones=(0.5, 2.0)))
    with pytest.raises(ConfigError, match="weight_decays must be a non-empty list"):
        train_linear(x, y, x, y, 2, LinearConfig(weight_decays=[]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_linear(x, y + 1, x, y, 2, LinearConfig())


def test_channel_batchnorm_is_vissls_batchnorm2d() -> None:
    """LinearHead(channels=C) on a flattened grid == VISSL's eval_mlp: BatchNorm2d(C) on the
    pooled map, flatten, Linear (same parameters, train-mode statistics)."""
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(16, 6, 3, 1, generator=gen) * 3 + 1
    head = LinearHead(18, 5, channels=6, generator=gen).train()
    with torch.no_grad():
        head.bn.weight.uniform_(0.5, 2.0, generator=gen)
        head.bn.bias.normal_(generator=gen)
    bn2d = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    bn2d.load_state_dict(head.bn.state_dict())
    expected = F.linear(bn2d.train()(fmap).flatten(1), head.linear.weight, head.linear.bias)
    torch.testing.assert_close(head(pool_tap(fmap, "res4", grid=(3, 1))), expected)
    torch.testing.assert_close(head.bn.running_var, bn2d.running_var)
