"""Score modules: per-slice outputs of a CT series turned into a clinical number and its category.

One file each in this package (``agatston.py``), or a site's own module registered under the entry
point group ``vision_foundry.scores`` (``[project.entry-points."vision_foundry.scores"]
my_score = "my_package.my_score"``). A module defines:

- ``NAME``: what it is called (``--score NAME``);
- ``CATEGORIES``: its categories, lowest first (evaluation treats them as ordered);
- ``score(slices) -> ScoreResult``: over ``ScoredSlice`` values in anatomical order; each lesion
  row names its ``slice`` and pixel box (``top``, ``left``, ``bottom``, ``right``), which the
  review images draw;
- ``category(total) -> str``: the category of a total;
- optionally ``THRESHOLD_HU``: the pixels it considers, drawn in the review images.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType

import numpy as np

from dinomx.errors import UserError

ENTRY_POINT_GROUP = "vision_foundry.scores"


class ScoreError(UserError, LookupError):
    """A score that is not installed, or a module that is not a score."""


@dataclass
class ScoredSlice:
    index: int  # position in the series, in anatomical order
    position: float | None  # mm along the slice normal
    hu: np.ndarray  # (rows, columns) Hounsfield units
    region: np.ndarray  # (rows, columns) bool: where the score may count (the head's lesions, or a given region)
    pixel_spacing: tuple[float, float]  # (row, column) mm
    thickness: float  # mm


@dataclass
class ScoreResult:
    name: str
    total: float
    category: str
    lesions: list[dict] = field(default_factory=list)  # one row each; the module says which columns
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"score": self.name, "total": self.total, "category": self.category, "lesions": self.lesions,
                **self.details}


def _check(module: ModuleType, where: str) -> ModuleType:
    missing = [name for name in ("NAME", "CATEGORIES", "score", "category") if not hasattr(module, name)]
    if missing:
        raise ScoreError(f"{where}: not a score module (it lacks {', '.join(missing)})")
    return module


def available() -> dict[str, ModuleType]:
    """Every installed score by name: this package's modules, then the entry points'."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = _check(importlib.import_module(f"{__name__}.{info.name}"), f"{__name__}.{info.name}")
        found[module.NAME] = module
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, _check(point.load(), f"entry point {point.name} = {point.value}"))
    return found


def get(name: str) -> ModuleType:
    scores = available()
    if name not in scores:
        raise ScoreError(f"score: unknown {name!r}; installed: {sorted(scores)}")
    return scores[name]
