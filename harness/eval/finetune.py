"""Full fine-tuning of a trunk plus a linear classifier, the paper's recipe (SEER 4.1).

SGD with momentum 0.9, weight decay 1e-4, LR 0.0125 per 256 images, divided
by 10 after 30 of 35 epochs, SwAV's augmentation for training, top-1 on
centre crops. Epochs and the decay point are fractions of the configured
length, so a low-shot subset (1%, 10%: the paper's Table 2) trains the same
schedule shape on fewer images.

Several ranks: the model is wrapped in torch's DistributedDataParallel and
each rank reads its share of every epoch through DistributedSampler; the
global batch is `batch_size` whatever the world size. BatchNorm keeps
per-rank statistics (torch's SyncBatchNorm refuses CPU tensors). Validation
reuses the sharded feature extraction: the classifier is linear on the
pooled features, so logits = classifier(pool features) exactly.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from harness.config.schema import FinetuneEvalConfig
from harness.eval.features import extract
from harness.eval.sets import LabelledSets


def out_dim(trunk: nn.Module, crop: int, device: torch.device) -> int:
    """The trunk's pooled width, by one tiny forward (any RegNet, ResNet or custom layout)."""
    was = trunk.training
    trunk.eval()
    with torch.no_grad():
        dim = trunk(torch.zeros(1, 3, crop, crop, device=device)).shape[1]
    trunk.train(was)
    return int(dim)


def decay_epochs(cfg: FinetuneEvalConfig) -> list[int]:
    """Epochs after which the LR drops x0.1: the configured fractions of cfg.epochs, at least epoch 1."""
    return sorted({max(1, round(f * cfg.epochs)) for f in cfg.decay_at if round(f * cfg.epochs) < cfg.epochs})


def finetune(trunk: nn.Module, sets: LabelledSets, train_set: Any, cfg: FinetuneEvalConfig, *,
             crop: int, device: torch.device, seed: int, num_workers: int, show: bool = True) -> dict[str, Any]:
    """Train trunk + classifier on `train_set` (augmented views of sets.train's images), then top-1/top-5
    on sets.val. Every rank must call it; rank 0 gets the metrics, others an empty dict."""
    from harness.eval.knn import topk_accuracy

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(seed)
    trunk = trunk.to(device)
    classifier = nn.Linear(out_dim(trunk, crop, device), len(sets.classes)).to(device)
    nn.init.normal_(classifier.weight, std=0.01)  # torchvision's RegNet classifier init
    nn.init.zeros_(classifier.bias)
    model: nn.Module = nn.Sequential(trunk, classifier)
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = max(1, cfg.batch_size // world)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=num_workers, drop_last=False)
    lr = cfg.base_lr * per_rank * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, decay_epochs(cfg), gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * len(loader), desc="fine-tune", unit="step", disable=not (show and rank == 0),
               dynamic_ncols=True, mininterval=1.0)
    losses: list[torch.Tensor] = []
    model.train()
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            loss = criterion(model(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            bar.update(1)
        schedule.step()
        if losses:
            bar.set_postfix(loss=f"{losses[-1].item():.3f}", lr=f"{schedule.get_last_lr()[0]:.3g}")
    bar.close()
    val = extract(trunk, sets.val, sets.val_labels, taps=("pool",), batch_size=per_rank, num_workers=num_workers,
                  device=device, rank=rank, world_size=world, desc="val", show=show)
    if rank != 0:
        return {}
    with torch.no_grad():
        logits = classifier(val.taps["pool"].to(device)).cpu()
    first, last = (losses[0].item(), losses[-1].item()) if losses else (math.nan, math.nan)
    return {**topk_accuracy(logits, val.labels), "epochs": cfg.epochs, "steps": len(losses), "lr": lr,
            "decay_epochs": decay_epochs(cfg), "train_images": len(train_set), "loss_first": first,
            "loss_last": last, "seconds": time.perf_counter() - start}
