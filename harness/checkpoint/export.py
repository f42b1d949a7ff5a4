"""`harness export`: one consolidated trunk file from a sharded checkpoint or a VISSL SEER checkpoint.

The file holds the trunk's state dict in torchvision's key names
(``stem.0.weight``, ``trunk_output.block1.block1-0.f.a.0.weight``, ... for a
RegNet; ``conv1.weight``, ``layer1.0...`` for a ResNet), every floating tensor
fp32 and contiguous, BatchNorm's ``num_batches_tracked`` kept (int64).

``fc`` is not in it: the harness trunk replaces torchvision's classifier by
``nn.Identity`` (harness/models/regnet.py), and an SSL trunk has no trained
classifier to export. So it loads with ``strict=True`` into
  * the harness trunk of the same widths (`build_trunk_from_export` builds one
    from the file's metadata), and
  * a ``torchvision.models.RegNet`` (or ``ResNet``) of the same widths once its
    classifier is dropped: ``model.fc = nn.Identity()``, then
    ``model.load_state_dict(state, strict=True)`` (`load_into_torchvision`).
``--with-head`` adds the SwAV projection head and prototypes as ``head.*`` and
``prototypes.*`` (`read_export` leaves them out unless asked).

Two layouts, the same tensors:
  * ``.safetensors`` (default): the state dict, and the metadata below as the
    file's string metadata (`safetensors.safe_open(f, "pt").metadata()`);
  * ``.pt`` / ``.pth``: ``torch.save({"state_dict": ..., "meta": ...})``, the
    layout mmengine and timm checkpoints use; loads with ``weights_only=True``.
Metadata (all strings): ``format`` (harness-trunk-v1), ``arch`` (a preset name,
or ``regnet``), ``regnet`` (the RegNetSpec as JSON, custom RegNets of a harness
run), ``layout`` (stage widths, depths, group widths, bottleneck multipliers,
SE ratio, stem width as JSON: everything `build_regnet` and torchvision's
``BlockParams`` need), ``contents``, ``step``, ``source``, ``source_format``
and, from a harness checkpoint, ``config`` (the resolved run config as JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from harness.checkpoint.layout import read_tensors
from harness.checkpoint.vissl import infer_layout, named, to_torchvision, trunk_state
from harness.config.loader import ConfigError
from harness.config.schema import ModelConfig, RegNetSpec
from harness.models.regnet import StageLayout, build_regnet, regnet_layout
from harness.models.zoo import CUSTOM_REGNET, build_trunk, list_models, preset_spec

FORMAT = "harness-trunk-v1"
FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
TRUNK, HEADS = "trunk.", ("head.", "prototypes.")
FC_NOTE = "not included: set model.fc = torch.nn.Identity() before load_state_dict(strict=True)"


@dataclass(frozen=True)
class Export:
    """What was written: for the command's summary line."""

    path: Path
    arch: str
    tensors: int
    values: int
    meta: dict[str, str]
    note: Optional[str] = None  # something the user should know (a custom layout was inferred)


def output_format(out: str | Path, fmt: Optional[str] = None) -> str:
    """``safetensors`` or ``pt``: the explicit choice, else the file's suffix; checked before any work."""
    if fmt is not None:
        if fmt not in ("safetensors", "pt"):
            raise ConfigError(f"--format {fmt!r}: give safetensors or pt")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: name a .safetensors, .pt or .pth file, or say --format safetensors|pt")
    return FORMATS[suffix]


# ------------------------------------------------------------------ checking against a trunk


def _expected(arch: str, regnet: Optional[RegNetSpec], layout: Optional[StageLayout]) -> dict[str, torch.Size]:
    """Key -> shape of the harness trunk, built on the meta device (no memory, even for SEER-10B)."""
    with torch.device("meta"):
        trunk = build_regnet(layout) if layout is not None else build_trunk(arch, regnet)
    return {k: v.shape for k, v in trunk.state_dict().items()}


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str,
                origin: Optional[Mapping[str, str]] = None) -> None:
    """Same keys, same shapes as the trunk; else one line naming the first offenders.

    ``origin`` maps names back to the source's (VISSL) names for the message."""
    def src(key: str) -> str:
        return origin[key] if origin and key in origin else key

    missing = [k for k in expected if k not in state]
    extra = [src(k) for k in state if k not in expected]
    shapes = [f"{src(k)} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items()
              if k in state and tuple(state[k].shape) != tuple(s)]
    problems = [f"{label}: {named(keys)}" for label, keys in
                (("missing", missing), ("left over", extra), ("shape", shapes)) if keys]
    if problems:
        raise ConfigError(f"{what}: {'; '.join(problems)}")


def _exportable(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).contiguous()


# ------------------------------------------------------------------ writing and reading


def _write(state: dict[str, torch.Tensor], meta: dict[str, str], out: Path, fmt: str) -> None:
    """Atomically (a temporary file, then a rename): a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    seen: set[int] = set()
    for key, t in state.items():  # safetensors refuses tensors sharing memory (tied or viewed)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            state[key] = t.clone()
        seen.add(ptr)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata=meta)
    else:
        torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, out)


def read_export(path: str | Path, *, with_head: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of an exported file; the trunk only unless ``with_head``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give a file written by `harness export`")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; safetensors a JSON header
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(blob, dict) and "state_dict" in blob and "meta" in blob):
            raise ConfigError(f"{path}: not a `harness export` file (no state_dict and meta)")
        state, meta = dict(blob["state_dict"]), dict(blob["meta"])
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if not with_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    return state, meta


def build_trunk_from_export(path: str | Path) -> nn.Module:
    """The harness trunk the file describes (a torchvision RegNet/ResNet, ``fc`` = Identity), loaded strictly."""
    state, meta = read_export(path)
    layout = meta.get("layout")
    if layout:
        trunk = build_regnet(StageLayout(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in json.loads(layout).items()}))
    else:
        trunk = build_trunk(meta["arch"])
    trunk.load_state_dict(state, strict=True)
    return trunk


def load_into_torchvision(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an exported trunk into a torchvision RegNet/ResNet of the same widths, strictly.

    The classifier is replaced by ``nn.Identity`` first (the file has no ``fc``,
    see the module docstring); the model then returns pooled features."""
    state, _ = read_export(path)
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    return model


def _meta(arch: str, layout: Optional[StageLayout], contents: str, source: str, source_format: str,
          **extra: Any) -> dict[str, str]:
    meta = {"format": FORMAT, "arch": arch, "contents": contents, "source": source,
            "source_format": source_format, "fc": FC_NOTE}
    if layout is not None:
        meta["layout"] = json.dumps(dataclasses.asdict(layout))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items() if v is not None})
    return meta


def _layout_of(cfg: ModelConfig) -> Optional[StageLayout]:
    """The stage layout of a RegNet trunk config; None for a ResNet."""
    if cfg.arch == CUSTOM_REGNET:
        return regnet_layout(cfg.regnet) if cfg.regnet is not None else None
    try:
        return regnet_layout(preset_spec(cfg.arch))
    except ValueError:  # a ResNet, or an unknown name that building the trunk reports
        return None


def _summary(out: Path, arch: str, state: Mapping[str, torch.Tensor], meta: dict[str, str],
             note: Optional[str] = None) -> Export:
    return Export(out, arch, len(state), sum(t.numel() for t in state.values()), meta, note)


# ------------------------------------------------------------------ the two sources


def read_checkpoint_trunk(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig,
                                                           dict[str, torch.Tensor], dict[str, Any]]:
    """(trunk state, its model config, the other tensors, manifest) of a harness checkpoint, checked by shape.

    ``checkpoint``: a ``checkpoints/step_*`` folder or a run folder (its newest
    complete checkpoint); any world size and backend, read in this one process
    (DCP reassembles the shards: nothing is consolidated first)."""
    tensors, manifest = read_tensors(checkpoint)
    source = manifest["path"]
    model = (manifest.get("config") or {}).get("model")
    if not isinstance(model, dict) or "arch" not in model:
        raise ConfigError(f"{source}: the manifest's config has no model.arch: cannot tell which trunk it holds")
    regnet = RegNetSpec(**model["regnet"]) if model.get("regnet") else None
    cfg = ModelConfig(arch=model["arch"], regnet=regnet)
    trunk = {k[len(TRUNK):]: v for k, v in tensors.items() if k.startswith(TRUNK)}
    if not trunk:
        raise ConfigError(f"{source}: no trunk.* tensors in the checkpoint: not an SSL method with a trunk")
    try:
        expected = _expected(cfg.arch, cfg.regnet, None)
    except ValueError as err:
        raise ConfigError(f"{source}: model {cfg.arch!r}: {err}") from err
    check_state(trunk, expected, f"{source}: trunk does not match model.arch {cfg.arch}")
    state = {k: _exportable(trunk[k]) for k in expected}  # the trunk's own order
    return state, cfg, {k: v for k, v in tensors.items() if not k.startswith(TRUNK)}, manifest


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, with_head: bool = False,
                      fmt: Optional[str] = None) -> Export:
    """The trunk (and with ``with_head`` the head and prototypes) of a harness checkpoint, in one file.

    ``checkpoint``: a ``checkpoints/step_*`` folder or a run folder (its newest
    complete checkpoint); any world size and backend, read in this one process."""
    fmt, out = output_format(out, fmt), Path(out)
    state, cfg, tensors, manifest = read_checkpoint_trunk(checkpoint)
    source = manifest["path"]
    if with_head:
        heads = sorted(k for k in tensors if k.startswith(HEADS))
        if not heads:
            raise ConfigError(f"{source}: --with-head, but the checkpoint has no head.* or prototypes.* tensors")
        state.update({k: _exportable(tensors[k]) for k in heads})
    meta = _meta(cfg.arch, _layout_of(cfg), "trunk,head,prototypes" if with_head else "trunk", source,
                 manifest.get("format", "harness"), step=str(manifest.get("step")),
                 regnet=dataclasses.asdict(cfg.regnet) if cfg.regnet else None, config=manifest.get("config"))
    _write(state, meta, out, fmt)
    return _summary(out, cfg.arch, state, meta)


def _load_source(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise ConfigError(f"--from-vissl {path}: no such file: give a VISSL checkpoint (.torch, .pth) "
                          "or a .safetensors trunk")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--from-vissl {path}: torch.load(weights_only=True) refused it ({first}); if you "
                          "trust the file, add --trust-pickle") from None
    except Exception as err:  # a truncated or foreign file: say so in one line
        raise ConfigError(f"--from-vissl {path}: torch.load cannot read it ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}): not a checkpoint "
                          "written by torch.save?") from None


def _preset_of(layout: StageLayout) -> Optional[str]:
    for name in list_models():
        try:
            if regnet_layout(preset_spec(name)) == layout:
                return name
        except ValueError:  # a ResNet
            continue
    return None


def read_vissl(source: str | Path, *, arch: Optional[str] = None, trust_pickle: bool = False,
               what: Optional[str] = None) -> tuple[dict[str, torch.Tensor], str, StageLayout, Optional[str]]:
    """(trunk state in torchvision names, arch, layout, note) of a VISSL SEER RegNet trunk, checked by shape.

    With ``arch`` every key and shape must match that preset's trunk; without,
    the widths are read off the tensors and named by the preset that has them
    (``regnet`` with the layout when none does). Shared by `convert_vissl`
    and by evaluation, which reads a VISSL file without writing an export."""
    source = Path(source)
    what = what or f"--from-vissl {source}"
    state, origin = to_torchvision(trunk_state(_load_source(source, trust_pickle), what), what)
    note = None
    if arch is not None:
        try:
            layout = regnet_layout(preset_spec(arch))
        except ValueError as err:
            raise ConfigError(f"--arch {arch}: {err}") from err
        try:
            found = infer_layout(state, what)
        except ConfigError:
            found = None  # the key-by-key check below names what is missing
        if found is not None and (found.widths, found.depths) != (layout.widths, layout.depths):
            raise ConfigError(f"{what} is a trunk of widths {list(found.widths)}, depths {list(found.depths)} "
                              f"({_preset_of(found) or 'no preset'}), not --arch {arch} (widths "
                              f"{list(layout.widths)}, depths {list(layout.depths)})")
    else:
        layout = infer_layout(state, what)
        arch = _preset_of(layout) or CUSTOM_REGNET
        if arch == CUSTOM_REGNET:
            note = (f"no preset has widths {list(layout.widths)}, depths {list(layout.depths)}, group widths "
                    f"{list(layout.group_widths)}: read as a custom RegNet (layout in the metadata); "
                    "give --arch to insist on a preset")
    expected = _expected(arch, None, layout)
    for key in expected:  # BN buffers that older BatchNorms did not save: torch's own default
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    check_state(state, expected, f"{what} does not match {arch} (widths {list(layout.widths)})", origin)
    return {k: _exportable(state[k]) for k in expected}, arch, layout, note


def convert_vissl(source: str | Path, out: str | Path, *, arch: Optional[str] = None, fmt: Optional[str] = None,
                  trust_pickle: bool = False) -> Export:
    """A VISSL SEER RegNet trunk (vissl.py names) as a `harness export` file, checked by shape (`read_vissl`)."""
    fmt, out, source = output_format(out, fmt), Path(out), Path(source)
    state, arch, layout, note = read_vissl(source, arch=arch, trust_pickle=trust_pickle)
    meta = _meta(arch, layout, "trunk", str(source), "vissl")
    _write(state, meta, out, fmt)
    return _summary(out, arch, state, meta, note)
