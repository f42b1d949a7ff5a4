"""Linear probe on frozen features, as VISSL ran it for the SEER RegNets.

VISSL's recipe (facebookresearch/vissl; the command in projects/SEER/README.md
combines the base config with one per model):
- configs/config/benchmark/linear_image_classification/imagenet1k/
  eval_resnet_8gpu_transfer_in1k_linear.yaml: SGD, momentum 0.9, nesterov,
  weight_decay 5e-4, 28 epochs, LR 0.01 per 256 images (auto_lr_scaling,
  linear) divided by 10 at epochs 8, 16, 24 (multistep, update_interval:
  epoch), regularize_bn False, regularize_bias True; train images
  RandomResizedCrop(224) + flip, test Resize(256) + CenterCrop(224).
- .../imagenet1k/models/regnet{8Gf,16Gf,32Gf,64Gf_3,128Gf,256Gf_1,3B,10B}.yaml:
  LINEAR_EVAL_FEAT_POOL_OPS_MAP pools res4 and res5 with AdaptiveAvgPool2d
  to a per-model grid (`VISSL_GRIDS` below) and takes avgpool as is; each
  tap gets an `eval_mlp` head (regnet10B/3B: `eval_mlp_fsdp`, the same head
  sharded); avgpool also gets a plain `mlp` head (no BatchNorm).
- vissl/models/heads/linear_eval_mlp.py (`eval_mlp`): BatchNorm2d over the
  pooled map's channels (so one mean/var per channel, shared by its grid
  cells), flatten, Linear; vissl/models/heads/mlp.py: PyTorch's default
  Linear init; vissl/config/defaults.yaml: MODEL.HEAD.BATCHNORM_EPS 1e-5,
  BATCHNORM_MOMENTUM 0.1, PARAMS_MULTIPLIER 1.0.

What differs here, and why:
- heads train on features extracted once and cached (centre crops), not on
  fresh RandomResizedCrops each epoch: that is what makes a weight-decay
  sweep cheap (issue 14). Expect slightly less regularisation than VISSL's.
- the schedule is in fractions of training (milestones 8/28, 16/28, 24/28 of
  28 epochs), so any data size trains VISSL's 28 epochs with VISSL's decays;
  the LR scales with the batch actually used (min(batch_size, n_train)).
- a sweep trains one head per weight decay in the same pass over the same
  shuffled batches, all from the same initial weights; the best on the
  validation features is reported (VISSL, too, reports ImageNet val).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from harness.config.loader import ConfigError
from harness.eval.knn import topk_accuracy
from harness.models.features import TAPS

# VISSL's AdaptiveAvgPool2d output grid per tap, keyed by the tap's channel count (= the eval_mlp's
# in_channels in the model configs above, which are the SEER RegNetYs' stage widths). The `*_a8`
# width-aligned variants of harness.models.zoo take their parent's grid.
VISSL_GRIDS: dict[str, dict[int, tuple[int, int]]] = {
    "res4": {
        896: (3, 3),     # regnet8Gf
        1232: (3, 3),    # regnet16Gf
        1392: (7, 1),    # regnet32Gf
        1968: (5, 1),    # regnet64Gf_3
        2904: (3, 1),    # regnet128Gf
        4103: (2, 1),    # regnet256Gf_1
        4136: (2, 1),    # regnety_256gf_a8 (harness)
        10120: (2, 1),   # regnet3B
        11110: (2, 1),   # regnet10B
        11088: (2, 1),   # seer_10b_a8 (harness)
    },
    "res5": {
        2016: (6, 1),    # regnet8Gf
        3024: (4, 1),    # regnet16Gf
        3712: (3, 1),    # regnet32Gf
        4920: (2, 1),    # regnet64Gf_3
        7392: (2, 1),    # regnet128Gf
        10444: (1, 2),   # regnet256Gf_1
        10528: (1, 2),   # regnety_256gf_a8 (harness)
        25760: (2, 1),   # regnet3B
        28280: (2, 1),   # regnet10B
        28224: (2, 1),   # seer_10b_a8 (harness)
    },
}
# Other trunks: the output grids of VISSL's ResNet-50 benchmark (eval_resnet_8gpu_transfer_in1k_linear.yaml,
# AvgPool2d on 56/28/14/7 px maps -> 6x6, 4x4, 3x3, 2x2, about 9k dims each), taken adaptively.
DEFAULT_GRIDS: dict[str, tuple[int, int]] = {"res2": (6, 6), "res3": (4, 4), "res4": (3, 3), "res5": (2, 2)}


def tap_grid(tap: str, channels: int) -> tuple[int, int]:
    """VISSL's pooled grid for a res tap with `channels` channels (table, else the ResNet-50 grid)."""
    if tap not in DEFAULT_GRIDS:
        raise ConfigError(f"unknown feature tap {tap!r}; valid taps: {', '.join(TAPS)}")
    return VISSL_GRIDS.get(tap, {}).get(channels, DEFAULT_GRIDS[tap])


def pool_tap(x: Tensor, tap: str, grid: Optional[tuple[int, int]] = None) -> Tensor:
    """Flat [N, D] feature of one tap, pooled as VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP does.

    res2..res5 ([N, C, H, W]): AdaptiveAvgPool2d to `grid` (default: `tap_grid`; a
    grid larger than the map is cut to the map so no cell repeats another), then
    flattened channel-major (torch.flatten), so column c * cells + i is channel c
    of cell i, which `LinearHead(channels=C)` relies on. `pool` ([N, C], VISSL's
    avgpool + Identity) passes through.
    """
    if tap == "pool":
        if x.ndim == 4 and x.shape[2:] == (1, 1):
            x = x.flatten(1)
        if x.ndim != 2:
            raise ValueError(f"tap 'pool' expects [N, C] features, got shape {tuple(x.shape)}")
        return x
    if tap not in DEFAULT_GRIDS:
        raise ConfigError(f"unknown feature tap {tap!r}; valid taps: {', '.join(TAPS)}")
    if x.ndim != 4:
        raise ValueError(f"tap {tap!r} expects an [N, C, H, W] map, got shape {tuple(x.shape)}")
    gh, gw = grid if grid is not None else tap_grid(tap, x.shape[1])
    out = (min(gh, x.shape[2]), min(gw, x.shape[3]))
    return torch.flatten(F.adaptive_avg_pool2d(x, out), 1)


class LinearHead(nn.Module):
    """VISSL's `eval_mlp` (BatchNorm, then Linear) on flat pooled features; `batchnorm=False` is its `mlp`.

    `channels`: the tap's channel count when the features are a flattened
    [C, cells] grid (pool_tap of res4/res5), so BatchNorm keeps one mean/var
    per channel over the batch and the cells, exactly VISSL's BatchNorm2d on
    the pooled map. None: one per feature dimension (the `pool` tap, where
    that is the same thing). Weights start as PyTorch's default Linear init
    (uniform +-1/sqrt(in_dim), weight and bias) drawn from `generator`, so a
    seed fixes them without touching the global RNG.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        batchnorm: bool = True,
        *,
        channels: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        channels = channels or in_dim
        if in_dim % channels:
            raise ValueError(f"in_dim {in_dim} is not a whole number of cells of {channels} channels")
        self.channels = channels
        self.bn = nn.BatchNorm1d(channels, eps=1e-5, momentum=0.1) if batchnorm else None
        # skip_init: no draw from the global RNG for weights we overwrite at once.
        self.linear = nn.utils.skip_init(nn.Linear, in_dim, num_classes)
        bound = 1.0 / math.sqrt(in_dim)
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            # [N, C * cells] -> [N, C, cells]: BatchNorm1d then normalises per channel over N and cells.
            x = self.bn(x.view(x.shape[0], self.channels, -1)).flatten(1)
        return self.linear(x)


@dataclass
class LinearConfig:
    """VISSL's SEER linear-eval schedule (see module docstring), in fractions of training."""

    epochs: int = 28
    batch_size: int = 256
    base_lr: float = 0.01  # per 256 images; scaled by the batch used / 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decays: list[float] = field(default_factory=lambda: [5e-4])
    milestones: Sequence[float] = (8 / 28, 16 / 28, 24 / 28)  # fractions of `epochs`; () = constant LR
    gamma: float = 0.1
    batchnorm: bool = True
    seed: int = 0

    def check(self) -> None:
        """ConfigError naming the bad field and the fix, before any training."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"linear probe needs epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not self.base_lr > 0 or not 0 <= self.momentum < 1 or not 0 < self.gamma <= 1:
            raise ConfigError(
                f"linear probe needs base_lr > 0, 0 <= momentum < 1, 0 < gamma <= 1; got "
                f"{self.base_lr}, {self.momentum}, {self.gamma} (VISSL: 0.01, 0.9, 0.1)"
            )
        if not self.weight_decays or any(not wd >= 0 for wd in self.weight_decays):
            raise ConfigError(f"weight_decays must be a non-empty list of values >= 0, got {self.weight_decays}")
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise ConfigError(f"weight_decays has repeated values {self.weight_decays}; list each once")
        ms = list(self.milestones)
        if any(not 0 < m <= 1 for m in ms) or ms != sorted(ms):
            raise ConfigError(
                f"milestones are increasing fractions of training in (0, 1], got {ms} "
                f"(VISSL: 8/28, 16/28, 24/28)"
            )
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0; set nesterov=False or momentum=0.9")

    def milestone_epochs(self) -> list[int]:
        return [max(1, round(m * self.epochs)) for m in self.milestones]


@dataclass
class LinearResult:
    """Validation accuracy per weight decay and the best head (its state on the CPU)."""

    per_wd: dict[float, dict[str, float]]  # wd -> {"top1", "top5", "train_loss" (mean, last epoch)}
    best_wd: float
    best_top1: float
    best_top5: float
    lr: float  # the peak LR used, after scaling by the batch size
    head_state: dict[str, Tensor] = field(repr=False)

    def summary(self) -> dict:
        """JSON-ready: everything but the head's tensors."""
        out = asdict(self)
        out.pop("head_state")
        out["per_wd"] = {str(wd): v for wd, v in self.per_wd.items()}
        return out


def _check_data(x: Tensor, y: Tensor, num_classes: int, name: str) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{name}: need features [n, dim] and n labels, n > 0; got {tuple(x.shape)}, {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")


def train_linear(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    cfg: Optional[LinearConfig] = None,
    *,
    channels: Optional[int] = None,
    device: Optional[torch.device | str] = None,
) -> LinearResult:
    """Train one `LinearHead` per weight decay on cached features; report val top-1/top-5.

    `channels`: see `LinearHead` (the tap's channel count for res4/res5 grids).
    `device`: where to train (default: the features' device); features move
    there once. All heads see the same batches (a torch.Generator seeded with
    `cfg.seed` shuffles each epoch on the CPU) and start from the same
    weights, so they differ only by weight decay; their losses are summed
    into one backward, and one SGD (param groups per head; BatchNorm without
    decay, bias with, as VISSL's regularize_bn/regularize_bias) steps them
    all. MultiStepLR steps per epoch, as VISSL's `update_interval: epoch`.
    A final batch of one sample is skipped (BatchNorm cannot normalise it).
    Nothing in a step reads back to the host; losses sync once at the end.
    """
    cfg = cfg if cfg is not None else LinearConfig()
    cfg.check()
    _check_data(train_features, train_labels, num_classes, "train")
    _check_data(val_features, val_labels, num_classes, "val")
    if val_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"train and val features differ in width ({train_features.shape[1]} vs {val_features.shape[1]}): "
            "pool both from the same tap"
        )
    if cfg.batchnorm and train_features.shape[0] < 2:
        raise ValueError("a BatchNorm head needs at least 2 train samples; use more data or batchnorm=False")
    device = torch.device(device) if device is not None else train_features.device
    x_tr = train_features.to(device, torch.float32)
    y_tr = train_labels.to(device, torch.long)
    n, dim = x_tr.shape
    batch = min(cfg.batch_size, n)
    lr = cfg.base_lr * batch / 256

    gen = torch.Generator().manual_seed(cfg.seed)
    init = LinearHead(dim, num_classes, cfg.batchnorm, channels=channels, generator=gen)
    heads = nn.ModuleList(copy.deepcopy(init) for _ in cfg.weight_decays).to(device).train()
    groups = []
    for head, wd in zip(heads, cfg.weight_decays):
        groups.append({"params": list(head.linear.parameters()), "weight_decay": wd})
        if head.bn is not None:
            groups.append({"params": list(head.bn.parameters()), "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestone_epochs(), gamma=cfg.gamma)

    usable = n - 1 if n % batch == 1 and n > 1 else n
    epoch_loss = torch.zeros(len(heads), device=device)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)[:usable].to(device, non_blocking=True)
        epoch_loss.zero_()
        for idx in perm.split(batch):
            x, y = x_tr[idx], y_tr[idx]
            losses = torch.stack([F.cross_entropy(head(x), y) for head in heads])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            epoch_loss += losses.detach()
        sched.step()
    steps = math.ceil(usable / batch)
    train_loss = (epoch_loss / steps).tolist()

    per_wd: dict[float, dict[str, float]] = {}
    x_val = val_features.to(device, torch.float32)
    y_val = val_labels.to(device, torch.long)
    heads.eval()
    with torch.no_grad():
        for head, wd, loss in zip(heads, cfg.weight_decays, train_loss):
            per_wd[wd] = {**topk_accuracy(head(x_val), y_val, ks=(1, 5)), "train_loss": loss}
    # Best by top-1, then top-5; remaining ties go to the earlier entry of weight_decays.
    best = max(cfg.weight_decays, key=lambda wd: (per_wd[wd]["top1"], per_wd[wd]["top5"]))
    best_head = heads[cfg.weight_decays.index(best)]
    return LinearResult(
        per_wd=per_wd,
        best_wd=best,
        best_top1=per_wd[best]["top1"],
        best_top5=per_wd[best]["top5"],
        lr=lr,
        head_state={k: v.detach().cpu().clone() for k, v in best_head.state_dict().items()},
    )
