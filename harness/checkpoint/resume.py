"""Where a run starts: fresh, from its own newest checkpoint, or from another run's weights.

Decided before anything expensive is built, from manifests alone, so a wrong
path or an incompatible checkpoint costs one line and no GPU time:

* ``train.resume=auto`` (default): a run folder with a complete checkpoint
  continues from the newest one, which is what a requeued job needs;
* ``train.resume=never``: a folder holding results is refused (nothing is overwritten);
* ``train.resume=PATH``: continue from that checkpoint (or that run's newest);
* ``train.init_from=PATH``: a new run starting from those weights (all or trunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.checkpoint import layout
from harness.config.loader import ConfigError
from harness.config.schema import RunConfig

# Config entries that decide the shapes of what a checkpoint holds.
SHAPE_KEYS = ("model", "swav.head_dims", "swav.head_batchnorm", "swav.num_prototypes", "swav.queue_length",
              "swav.crops_for_assign")


@dataclass
class Start:
    kind: str  # fresh | resume | init
    checkpoint: Optional[Path] = None
    manifest: Optional[dict[str, Any]] = None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differing_keys(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = SHAPE_KEYS) -> list[str]:
    """Dotted config keys under `keys` whose values differ (e.g. model.arch)."""
    a, b = _flat(saved), _flat(current)
    chosen = [k for k in set(a) | set(b) if any(k == p or k.startswith(p + ".") for p in keys)]
    return sorted(k for k in chosen if a.get(k) != b.get(k))


def check_compatible(manifest: dict[str, Any], config: dict[str, Any], scope: str = "all") -> None:
    keys = ("model",) if scope == "trunk" else SHAPE_KEYS
    diff = differing_keys(manifest.get("config", {}), config, keys)
    if diff:
        saved, now = _flat(manifest.get("config", {})), _flat(config)
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in diff[:4])
        raise ConfigError(f"checkpoint {manifest['path']} was written by an incompatible config ({shown}): use the "
                          "checkpoint's config, or train.init_from=PATH train.init_from_scope=trunk to reuse its trunk")


def resolve_start(cfg: RunConfig, run_dir: Path, config: dict[str, Any]) -> Start:
    t = cfg.train
    if t.init_from:
        if layout.latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"train.init_from starts a new run but {run_dir} already holds checkpoints: choose "
                              "another train.run_name, or drop train.init_from to continue that run")
        manifest = layout.read_manifest(Path(t.init_from))
        check_compatible(manifest, config, t.init_from_scope)
        return Start("init", Path(manifest["path"]), manifest)
    if t.resume not in ("auto", "never"):
        manifest = layout.read_manifest(Path(t.resume))
        check_compatible(manifest, config)
        return Start("resume", Path(manifest["path"]), manifest)
    latest = layout.latest_checkpoint(run_dir)
    if latest is None:
        return Start("fresh")
    if t.resume == "never":
        raise ConfigError(f"run folder {run_dir} already holds checkpoints and train.resume=never: choose another "
                          "train.run_name or train.output_dir (nothing was overwritten), or train.resume=auto to "
                          "continue it")
    manifest = layout.read_manifest(latest)
    check_compatible(manifest, config)
    return Start("resume", latest, manifest)
