"""Optimizer from config: parameter groups, then LARS or plain SGD.

VISSL's LARC adapted every tensor, BatchNorm and bias included, with weight
decay on all of them; whether BN/bias should be excluded is disputed (vissl
PR 230), so `optim.lars.exclude_bn_bias` switches between the two. The
groups are always built in the same order (adapted first) and keep a
``name`` so that checkpoints line up and logs can tell them apart.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from harness.config.schema import OptimConfig
from harness.optim.lars import LARS


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters in named groups, in `model.named_parameters()` order.

    With LARS and ``exclude_bn_bias``, tensors with ndim <= 1 (BN affine
    parameters, biases) form a second group without trust ratio or weight
    decay; the group is kept even when empty, so the layout never depends
    on the model. Plain SGD gets one group: the switch belongs to LARS.
    """
    trainable = [p for _, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("build_optimizer: the model has no parameters with requires_grad=True")
    if not (cfg.lars.enabled and cfg.lars.exclude_bn_bias):
        return [{"name": "all", "params": trainable, "weight_decay": cfg.weight_decay}]
    return [
        {"name": "adapted", "params": [p for p in trainable if p.ndim > 1],
         "weight_decay": cfg.weight_decay, "lars_adapt": True},
        {"name": "bn_bias", "params": [p for p in trainable if p.ndim <= 1],
         "weight_decay": 0.0, "lars_adapt": False},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    norm_process_group: Any = None, groups: Optional[list[dict[str, Any]]] = None,
                    ) -> torch.optim.Optimizer:
    """LARS over `model`'s trainable parameters; with LARS disabled, every group without the trust ratio:
    torch.optim.SGD's update, gated on the device like every other step (`TorchEngine` skips a bad step
    through the optimizer's `skip`, which torch's SGD does not have).

    `lr` is the starting rate; the schedule overwrites it every step.
    `norm_process_group` is only for sharded parameters (FSDP): the group
    across which LARS sums per-shard norms. Leave it None for DDP.
    `groups`: parameter groups made elsewhere (an SSL method's `ParallelSpec`
    declares its own); default `param_groups(model, cfg)`.
    """
    groups = param_groups(model, cfg) if groups is None else groups
    if not cfg.lars.enabled:
        if norm_process_group is not None:
            raise ValueError("norm_process_group needs optim.lars.enabled")
        for group in groups:  # SGD's maths, with LARS's device-side skip of a bad step (torch's SGD has none)
            group["lars_adapt"] = False
    for group in groups:
        group["norm_process_group"] = norm_process_group
    return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                nesterov=cfg.nesterov, trust_coefficient=cfg.lars.trust_coefficient,
                eps=cfg.lars.eps, clip=cfg.lars.clip)
