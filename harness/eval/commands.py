"""`harness eval knn|linear|finetune CHECKPOINT`: evaluate a trunk, print the accuracy, keep a JSON record.

Launch it like pretraining (`torchrun --nproc_per_node N -m harness eval ...`,
`accelerate launch`): extraction and fine-tuning are split over the ranks.
Each result is written as JSON beside the checkpoint (or under `--out`)
with the exact command line, the resolved config, the checkpoint it read and
the images it used, so a number in a table can be traced to its run.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from harness.config.loader import ConfigError, to_dict
from harness.config.schema import EvalConfig, RunConfig

if TYPE_CHECKING:  # torch is imported when a command runs: `harness --help` and `harness config` stay quick
    import torch

KINDS = ("knn", "linear", "finetune")
PROBE_TAPS = ("res4", "res5", "pool")


def check_eval_config(e: EvalConfig) -> None:
    """Bad eval settings: one line each, before any checkpoint or image is read."""
    from harness.eval.data import check_builtin
    from harness.eval.lowshot import parse_subset

    check_builtin(e.builtin)
    if e.knn.k < 1 or e.knn.temperature <= 0:
        raise ConfigError(f"eval.knn: k={e.knn.k}, temperature={e.knn.temperature}: need k >= 1 and temperature > 0")
    bad = [t for t in e.linear.taps if t not in PROBE_TAPS]
    if bad or not e.linear.taps:
        raise ConfigError(f"eval.linear.taps={e.linear.taps}: choose from {', '.join(PROBE_TAPS)}")
    if not e.linear.weight_decays or e.linear.epochs < 1 or e.finetune.epochs < 1:
        raise ConfigError("eval.linear.weight_decays needs at least one value and eval.*.epochs must be >= 1")
    if e.crop < 1 or e.resize < e.crop:
        raise ConfigError(f"eval.crop={e.crop}, eval.resize={e.resize}: need 1 <= crop <= resize (VISSL: 224/256)")
    if e.batch_size < 1 or e.linear.batch_size < 1 or e.finetune.batch_size < 1:
        raise ConfigError("eval batch sizes must be >= 1")
    scale = e.finetune.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"eval.finetune.crop_scale={scale}: give [min, max] with 0 < min <= max <= 1")
    if e.subset:
        parse_subset(e.subset)


def eval_device(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(rank, world, device): joins the launcher's process group when there are several ranks."""
    import torch.distributed as dist

    from harness.runtime import init_process_group, pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.train.device, local)
    if world > 1 and not dist.is_initialized():
        init_process_group(device, rank, world)
    return rank, world, device


def result_dir(checkpoint: str, out: Optional[str], cfg: RunConfig) -> Path:
    """--out; else the run folder's `eval/` for a harness checkpoint; else output_dir/eval/<file stem>."""
    if out:
        return Path(out)
    path = Path(checkpoint)
    if path.is_dir():
        run = path.parent.parent if path.parent.name == "checkpoints" else path
        return run / "eval"
    return Path(cfg.train.output_dir) / "eval" / path.stem


def write_result(out_dir: Path, kind: str, record: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    path = out_dir / f"{kind}{'-random' if record['random_init'] else ''}-{stamp}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def evaluate(kind: str, cfg: RunConfig, checkpoint: str, *, random_init: bool = False, out: Optional[str] = None,
             trust_pickle: bool = False, show: bool = True,
             argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """Run one evaluation on every rank; rank 0 returns the record it wrote (with `path`), others None."""
    from harness.eval.checkpoint import load_trunk
    from harness.eval.run import knn_metrics_from, linear_results, set_features
    from harness.eval.sets import build_sets

    if kind not in KINDS:
        raise ConfigError(f"harness eval {kind}: choose one of {', '.join(KINDS)}")
    check_eval_config(cfg.eval)
    if kind == "finetune" and cfg.eval.recompute_bn:
        raise ConfigError("eval.recompute_bn=true applies to knn and linear: fine-tuning trains BatchNorm "
                          "itself, drop it")
    rank, world, device = eval_device(cfg)
    start = time.perf_counter()
    loaded = load_trunk(checkpoint, random_init=random_init, seed=cfg.train.seed, trust_pickle=trust_pickle)
    out_dir = result_dir(checkpoint, out, cfg)
    data_cache = Path(cfg.train.output_dir) / "eval-data"
    trunk = loaded.trunk.to(device)
    # the cache key: what was read (a step folder or a file) and when it was written; not the run folder,
    # whose time changes as soon as this command writes its eval/ folder into it
    source = {**loaded.source, "mtime_ns": Path(loaded.source["path"]).stat().st_mtime_ns}
    if kind == "finetune":
        from harness.eval.data import train_transform
        from harness.eval.finetune import finetune

        # one set: the train images augmented, val centre-cropped
        sets = build_sets(cfg.eval, cfg.data.augment, data_cache, rank == 0, train_transform=train_transform(
            cfg.eval.crop, cfg.data.augment.normalize_mean, cfg.data.augment.normalize_std,
            scale=tuple(cfg.eval.finetune.crop_scale)))
        results = finetune(trunk, sets, sets.train, cfg.eval.finetune, crop=cfg.eval.crop, device=device,
                           seed=cfg.eval.seed, num_workers=cfg.eval.num_workers, show=show)
    else:
        sets = build_sets(cfg.eval, cfg.data.augment, data_cache, rank == 0)
        if cfg.eval.recompute_bn:
            from harness.eval.features import recompute_batchnorm

            recompute_batchnorm(trunk, sets.train, batch_size=cfg.eval.batch_size,
                                num_workers=cfg.eval.num_workers, device=device)
            loaded.source["bn_statistics"] = f"recomputed on {sets.train_dir}"
            source["bn_statistics"] = loaded.source["bn_statistics"]  # other features: another cache entry
        taps = ("pool",) if kind == "knn" else tuple(dict.fromkeys(cfg.eval.linear.taps))
        train, val = set_features(trunk, sets, cfg, device, taps=taps, cache_dir=out_dir / "features",
                                  source=source, show=show)
        results = None
        if rank == 0:
            results = (knn_metrics_from(train, val, len(sets.classes), cfg) if kind == "knn"
                       else linear_results(train, val, len(sets.classes), cfg, device))
            results["features_cached"] = bool(train.cached and val.cached)
    if rank != 0:
        return None
    record = {"kind": kind, "results": results, "checkpoint": loaded.source, "random_init": random_init,
              "data": sets.describe,
              "command": shlex.join(["harness", *(sys.argv[1:] if argv is None else argv)]), "config": to_dict(cfg),
              "world_size": world, "device": str(device),
              "seconds": time.perf_counter() - start, "finished": datetime.now(timezone.utc).isoformat()}
    record["path"] = str(write_result(out_dir, kind, record))
    return record


def summary(record: dict[str, Any]) -> str:
    """One line per number a person looks for."""
    kind, r, data = record["kind"], record["results"], record["data"]
    bn = ", BatchNorm statistics recomputed" if "bn_statistics" in record["checkpoint"] else ""
    what = f"{record['checkpoint']['arch']} ({record['checkpoint']['kind']}{bn})"
    sizes = f"{data['train_images']} train / {data['val_images']} val images, {data['classes']} classes"
    if kind == "knn":
        k = record["config"]["eval"]["knn"]
        lines = [f"k-NN (k={k['k']}, T={k['temperature']}) of {what}: top-1 {r['top1']:.2f}%, "
                 f"top-5 {r['top5']:.2f}% ({sizes})"]
    elif kind == "linear":
        lines = [f"linear probe of {what} on {tap} ({v['features']}-d): top-1 {v['top1']:.2f}%, top-5 "
                 f"{v['top5']:.2f}% (best weight decay {v['best_weight_decay']:g}; {sizes})"
                 for tap, v in r.items() if isinstance(v, dict)]
    else:
        lines = [f"fine-tuned {what} for {r['epochs']} epochs: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
                 f"({sizes})"]
    return "\n".join(lines + [f"results in {record['path']}"])


def _cmd_eval(args: Any) -> int:
    from harness.config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"eval.data={args.data}")
    if args.subset:
        overrides.append(f"eval.subset={args.subset}")
    cfg = load_config(args.config, overrides)
    check_eval_config(cfg.eval)
    record = evaluate(args.eval_kind, cfg, args.checkpoint, random_init=args.random_init, out=args.out,
                      trust_pickle=args.trust_pickle, argv=args.argv)
    if record is not None:
        print(summary(record))
    return 0


def add_eval_commands(subparsers: Any) -> None:
    """`harness eval knn|linear|finetune CHECKPOINT [key=value ...]` (settings under `eval.*`)."""
    from harness.cli import DEFAULT_PRESET

    ev = subparsers.add_parser("eval", help="k-NN, linear probe or fine-tuning of a trunk on a labelled set "
                               "(built-in scenes or textures, or an ImageFolder with train/ and val/)")
    esub = ev.add_subparsers(dest="eval_kind", required=True)
    helps = {"knn": "weighted k-NN on pooled features (eval.knn.k, eval.knn.temperature)",
             "linear": "BN + linear heads on frozen, cached features of eval.linear.taps (res4, res5, pool)",
             "finetune": "fine-tune trunk + classifier (the paper's recipe, eval.finetune.*); --subset for low-shot"}
    for kind in KINDS:
        p = esub.add_parser(kind, help=helps[kind])
        p.add_argument("checkpoint", help="a run folder, a checkpoints/step_* folder (any backend, any world "
                       "size), a `harness export` file, or a VISSL SEER checkpoint")
        p.add_argument("--config", "-c", default=DEFAULT_PRESET, help="preset or YAML whose eval.* and "
                       f"data.augment normalisation apply (default: {DEFAULT_PRESET})")
        p.add_argument("--data", help="labelled folder with train/ and val/ (ImageFolder layout); default: the "
                       "built-in set eval.builtin (scenes, or textures)")
        p.add_argument("--subset", help="low-shot training subset: 1%%, 10%%, 0.05 or 5/class (balanced, seeded "
                       "by eval.seed)")
        p.add_argument("--random-init", action="store_true", help="the same trunk at its initialisation "
                       "(train.seed): the baseline a pretrained trunk must beat")
        p.add_argument("--out", help="folder for the JSON result and the feature cache (default: the run's eval/)")
        p.add_argument("--trust-pickle", action="store_true", help="torch.load a VISSL file holding Python objects "
                       "besides tensors (only for files you trust)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. eval.knn.k=10 "
                       "eval.linear.weight_decays=[1e-4,5e-4]")
        p.set_defaults(func=_cmd_eval)
