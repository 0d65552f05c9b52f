"""GeoJSON region annotations (QuPath / GeoJSON exports in level-0 pixel coordinates) to dense
per-tile masks and a majority label per tile."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.inputs import IngestError

log = logging.getLogger(__name__)
BACKGROUND = "background"
# Class names become folder names of the tile dataset, so they must be plain names.
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$")


@dataclass(frozen=True)
class Region:
    name: str
    exterior: list[tuple[float, float]]
    holes: list[list[tuple[float, float]]]


def _class_name(properties: dict) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    return properties.get("label") or properties.get("class") or properties.get("name")


def _ring(value, where: str, path: str) -> list[tuple[float, float]]:
    try:
        ring = [(float(x), float(y)) for x, y, *_ in value]
    except (TypeError, ValueError) as exc:
        raise IngestError(path, f"{where}: coordinates must be [x, y] number pairs") from exc
    if len(ring) < 3:
        raise IngestError(path, f"{where}: a polygon ring needs at least 3 points, got {len(ring)}")
    return ring


def read_regions(path: str | Path, lenient: bool = False) -> list[Region]:
    """Polygon and MultiPolygon features with a class name; anything else is refused by position,
    or, ``lenient``, left out with a warning (QuPath exports carry unclassified detections and
    point or line annotations)."""
    path = str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(path, f"not valid GeoJSON ({exc})") from exc
    features = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else (
        doc if isinstance(doc, list) else [doc])
    regions = []
    for index, feature in enumerate(features):
        where = f"features[{index}]"
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise IngestError(path, f"{where}: expected a Feature with a geometry")
        name = _class_name(feature.get("properties") or {})
        geometry = feature["geometry"]
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        polygons = {"Polygon": [coordinates], "MultiPolygon": coordinates}.get(kind)
        if lenient and (name is None or polygons is None):
            log.warning("%s: %s left out (%s)", path, where, "no class" if name is None else f"a {kind}, not a polygon")
            continue
        if not isinstance(name, str) or not _CLASS_NAME.match(name) or name == BACKGROUND:
            raise IngestError(path, f"{where}.properties.classification.name: expected a plain class name "
                                    f"(letters, digits, space, _ or -; not '{BACKGROUND}'), got {name!r}")
        if polygons is None:
            raise IngestError(path, f"{where}.geometry.type: expected Polygon or MultiPolygon, got {kind!r}")
        for p, rings in enumerate(polygons or []):
            if not rings:
                raise IngestError(path, f"{where}.geometry.coordinates[{p}]: empty polygon")
            regions.append(Region(
                name=name,
                exterior=_ring(rings[0], f"{where}.geometry", path),
                holes=[_ring(r, f"{where}.geometry", path) for r in rings[1:]],
            ))
    return regions


def tile_mask(regions: list[Region], classes: list[str], x: int, y: int, size: int, tile_size: int) -> np.ndarray:
    """uint8 mask of the level-0 square (x, y, size) at ``tile_size`` pixels: 0 is background,
    ``i + 1`` is ``classes[i]``. Later features paint over earlier ones."""
    scale = tile_size / size
    canvas = Image.new("L", (tile_size, tile_size), 0)
    draw = ImageDraw.Draw(canvas)
    for region in regions:
        index = classes.index(region.name) + 1

        def local(ring):
            return [((px - x) * scale, (py - y) * scale) for px, py in ring]

        draw.polygon(local(region.exterior), fill=index)
        for hole in region.holes:
            draw.polygon(local(hole), fill=0)
    return np.asarray(canvas)


def majority_label(mask: np.ndarray, classes: list[str]) -> str:
    counts = np.bincount(mask.ravel(), minlength=len(classes) + 1)
    winner = int(counts.argmax())
    return BACKGROUND if winner == 0 else classes[winner - 1]
