"""How a dataset's images were cut from their sources, written by ingestion beside the dataset
(``tiling.json``) and carried into the lineage of every model trained on it (``vf.tiling``), so
that inference on a new slide or series cuts it exactly as the model's training data was cut,
without asking the user.

A dataset records what ingestion did (every magnification it wrote); a model records the one
image it saw: a split of ``tiles/10x`` or a sharded dataset trained on ``10x.png`` saw 10x tiles
of a grid laid at the highest magnification.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.inputs import CHANNELS
from dinomx.errors import DataError
from dinomx.shards import is_sharded, read_index

TILING = "tiling.json"
MODALITIES = ("he", "ct")
_MAGNIFICATION = re.compile(r"^(\d+(?:\.\d+)?)x(?:\.png)?$")
# How far above a training split its dataset's tiling.json may be (tiles/shards/train: 2).
_LEVELS = 4


class TilingError(DataError):
    """A tiling record that does not say how to cut an input; the message names the field."""


@dataclass(frozen=True)
class Tiling:
    """``he``: square tiles of ``tile_size`` px at ``magnification`` centred on a grid laid at
    ``grid_magnification``, kept where ``min_tissue`` of the grid tile is tissue. ``ct``: one
    slice at a time through ``window`` (grey), or three channels (``2.5d``: slices i-1, i, i+1;
    ``windows``: three windows of slice i)."""

    modality: str
    magnification: float | None = None
    grid_magnification: float | None = None
    tile_size: int | None = None
    min_tissue: float | None = None
    window: tuple[float, float] | None = None
    channels: str | None = None
    windows: tuple[tuple[float, float], ...] = field(default=())

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise TilingError(f"tiling.modality: expected one of {list(MODALITIES)}, got {self.modality!r}")
        if self.modality == "he":
            for name in ("magnification", "grid_magnification", "tile_size", "min_tissue"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise TilingError(f"tiling.{name}: expected a non-negative number for slides, got {value!r}")
            if self.magnification > self.grid_magnification or self.tile_size < 8 or self.min_tissue > 1:
                raise TilingError(f"tiling: magnification {self.magnification:g} above the grid's "
                                  f"{self.grid_magnification:g}, tile_size {self.tile_size} under 8, or min_tissue "
                                  f"{self.min_tissue:g} over 1")
        else:
            if self.channels not in CHANNELS:
                raise TilingError(f"tiling.channels: expected one of {list(CHANNELS)}, got {self.channels!r}")
            if not (isinstance(self.window, (tuple, list)) and len(self.window) == 2 and self.window[1] > 0):
                raise TilingError(f"tiling.window: expected [center, width > 0] in HU, got {self.window!r}")
            if self.channels == "windows" and len(self.windows) != 3:
                raise TilingError(f"tiling.windows: three [center, width] pairs make the channels, got {self.windows!r}")

    @property
    def magnifications(self) -> tuple[float, ...]:
        """What a slide is read at: the grid's magnification, and the model's where it differs."""
        return tuple(sorted({self.grid_magnification, self.magnification}, reverse=True))

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, ())}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "tiling") -> Tiling:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise TilingError(f"{where}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise TilingError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(raw) - known):
            raise TilingError(f"{where}: unknown key(s) {unknown}; expected {sorted(known)}")
        if "window" in raw and isinstance(raw["window"], list):
            raw["window"] = tuple(raw["window"])
        if "windows" in raw and isinstance(raw["windows"], list):
            raw["windows"] = tuple(tuple(w) for w in raw["windows"])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise TilingError(f"{where}: {exc}") from None


def slide_record(magnifications: tuple[float, ...], tile_size: int, min_tissue: float) -> str:
    """``tiling.json`` of a slide dataset: every magnification ingestion wrote."""
    return json.dumps({"modality": "he", "magnifications": sorted(magnifications, reverse=True),
                       "tile_size": tile_size, "min_tissue": min_tissue}, sort_keys=True)


def series_record(window: tuple[float, float], channels: str, windows: tuple[tuple[float, float], ...]) -> str:
    """``tiling.json`` of a CT dataset."""
    return Tiling("ct", window=tuple(window), channels=channels,
                  windows=tuple(map(tuple, windows)) if channels == "windows" else ()).to_json()


def dataset_root(split: Path) -> Path | None:
    """The folder ingestion wrote (where its ``tiling.json`` is) above a split, if any."""
    for folder in [split, *split.parents][:_LEVELS + 1]:
        if (folder / TILING).is_file():
            return folder
    return None


def tiling_of(data: str | Path, image: str = "") -> Tiling | None:
    """The tiling of the images a model trains on from ``data`` (a split or the folder holding
    the splits), None for images that were not cut from slides or series (an image folder).
    ``image``: the shard component it trains on (``dataset.shard_image``), where not the index's."""
    if "://" in str(data):
        return None  # streamed shards: the tiling travels in the lineage of the dataset's local copy
    split = Path(data).resolve()
    root = dataset_root(split)
    if root is None:
        return None
    where = str(root / TILING)
    raw = json.loads((root / TILING).read_text())
    if raw.get("modality") != "he":
        return Tiling.from_json(json.dumps(raw), where)
    try:
        grid = max(float(m) for m in raw["magnifications"])
        tile_size, min_tissue = int(raw["tile_size"]), float(raw["min_tissue"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TilingError(f"{where}: expected magnifications, tile_size and min_tissue ({exc})") from None
    seen = _seen_magnification(split, root, image)
    return Tiling("he", magnification=seen or grid, grid_magnification=grid, tile_size=tile_size, min_tissue=min_tissue)


def _seen_magnification(split: Path, root: Path, image: str) -> float | None:
    """The magnification of the images a model reads under ``split``: a folder named for it
    (``tiles/10x/train``), or the image component of a split of shards."""
    for part in split.relative_to(root).parts:
        if match := _MAGNIFICATION.match(part):
            return float(match.group(1))
    candidates = [split, *(p for p in (split / "train",) if p.is_dir())]
    for folder in candidates:
        if is_sharded(folder):
            match = _MAGNIFICATION.match(image or read_index(folder).image)
            return float(match.group(1)) if match else None
    return None
