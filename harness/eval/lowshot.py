"""Low-shot subsets of a labelled set: the paper's fine-tuning on 1% and 10% of the labels (Table 2).

The paper (after SwAV and SimCLR) fine-tunes on SimCLR's fixed ImageNet
subsets `1percent.txt` / `10percent.txt`: 12,811 and 128,116 images, close to
balanced at about 13 and 128 images per class. For any other labelled set we
draw the subset ourselves, exactly balanced: every class gets the same count,
either `per_class` or `fraction` of the SMALLEST class (rounded half up, at
least 1), so a skewed set does not turn into a skewed subset. On ImageNet,
whose classes hold 732-1300 images, `fraction=0.01` therefore gives 7 per
class; `per_class=13` / `per_class=128` match the paper's subset sizes.

Each class is shuffled by its own `torch.Generator`, seeded from (seed,
class), so a class's draw does not depend on the other classes, and a
smaller subset is a prefix of the same shuffle: with one seed the 1% subset
lies inside the 10% one, and results across sizes differ by the labels
added, not by a new draw.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch

from harness.config.loader import ConfigError


def _class_generator(seed: int, label: int) -> torch.Generator:
    """One stream per (seed, class), from a hash of both.

    Hashed rather than packed into one integer: torch's CPU generator
    (mt19937) keeps only the low 32 bits of a seed, so (seed << 32) | class
    would ignore the seed.
    """
    digest = hashlib.sha256(f"lowshot:{seed}:{label}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def lowshot_indices(labels: Sequence[int] | torch.Tensor, *, fraction: float | None = None,
                    per_class: int | None = None, seed: int = 0) -> list[int]:
    """Sorted indices of a balanced, seeded subset: `per_class` per class, or `fraction` of the smallest class."""
    if (fraction is None) == (per_class is None):
        raise ConfigError("a low-shot subset needs exactly one of fraction (e.g. 0.01 for 1%) or per_class "
                          f"(e.g. 13), got fraction={fraction} per_class={per_class}")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if labels.numel() == 0:
        raise ConfigError("a low-shot subset needs a labelled set with at least one image")
    classes, sizes = labels.unique(return_counts=True)
    if per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ConfigError(f"low-shot per_class must be an integer >= 1, got {per_class!r}")
        count = per_class
    else:
        if not 0 < fraction <= 1:
            raise ConfigError(f"low-shot fraction must be in (0, 1] (0.01 for 1%), got {fraction}")
        count = max(1, math.floor(fraction * int(sizes.min()) + 0.5))
    short = [(int(c), int(n)) for c, n in zip(classes, sizes) if n < count]
    if short:
        shown = ", ".join(f"class {c} has {n}" for c, n in short[:3]) + (" ..." if len(short) > 3 else "")
        raise ConfigError(f"low-shot subset of {count} images per class, but {shown}: "
                          "ask for fewer per class or use a fraction")
    order = torch.argsort(labels, stable=True)  # indices grouped by class, ascending within a class
    chosen = []
    for c, members in zip(classes.tolist(), torch.split(order, sizes.tolist())):
        shuffle = torch.randperm(len(members), generator=_class_generator(seed, c))
        chosen.append(members[shuffle[:count]])
    return sorted(torch.cat(chosen).tolist())


_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%$")
_FRACTION = re.compile(r"^(0?\.\d+|1(?:\.0*)?)$")
_SHOTS = re.compile(r"^(\d+)\s*(?:/\s*class|-?\s*shots?)$", re.IGNORECASE)


def parse_subset(text: str) -> tuple[float | None, int | None]:
    """`(fraction, per_class)` from the CLI's words: "1%", "10%", "0.1", "5/class" or "5-shot"."""
    words = text.strip()
    if match := _PERCENT.match(words):
        fraction = float(match.group(1)) / 100
    elif match := _FRACTION.match(words):
        fraction = float(match.group(1))
    elif match := _SHOTS.match(words):
        if int(match.group(1)) < 1:
            raise ConfigError(f"low-shot subset {text!r} asks for no images per class: use at least 1/class")
        return None, int(match.group(1))
    else:
        raise ConfigError(f"cannot read low-shot subset {text!r}: write a percentage (1%, 10%), a fraction in (0, 1] "
                          "(0.1) or images per class (5/class, 5-shot)")
    if not 0 < fraction <= 1:
        raise ConfigError(f"low-shot subset {text!r} must be more than 0% and at most 100%")
    return fraction, None
