"""GeoJSON region annotations (QuPath / GeoJSON exports in level-0 pixel coordinates) to dense
per-tile masks and a majority label per tile, and back: predicted regions as a FeatureCollection
QuPath imports. A pixel belongs to a region when its centre lies inside it (``data.vectorize``),
so regions written from a mask read back as the same mask."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.inputs import IngestError
from data.tiling import dataset_root
from data.vectorize import Polygon, fill

log = logging.getLogger(__name__)
BACKGROUND = "background"
# Beside a dataset built from corrected annotations: which file annotated each slide, and the
# model versions that proposed them (the ``proposed_by`` of their features, or of PROVENANCE).
ANNOTATIONS = "annotations.json"
PROVENANCE = "provenance.json"
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
    ``i + 1`` is ``classes[i]``; a pixel takes the class of the region its centre lies in (a hole
    is not part of its region). Later features paint over earlier ones."""
    scale = tile_size / size
    canvas = np.zeros((tile_size, tile_size), np.uint8)
    for region in regions:
        xs = [px for ring in (region.exterior, *region.holes) for px, _ in ring]
        ys = [py for ring in (region.exterior, *region.holes) for _, py in ring]
        if max(xs) <= x or min(xs) >= x + size or max(ys) <= y or min(ys) >= y + size:
            continue
        rings = [[((px - x) * scale, (py - y) * scale) for px, py in ring] for ring in (region.exterior, *region.holes)]
        canvas[fill(rings, canvas.shape)] = classes.index(region.name) + 1
    return canvas


def majority_label(mask: np.ndarray, classes: list[str]) -> str:
    counts = np.bincount(mask.ravel(), minlength=len(classes) + 1)
    winner = int(counts.argmax())
    return BACKGROUND if winner == 0 else classes[winner - 1]


def feature_collection(regions: dict[str, list[Polygon]], colours: dict[str, tuple[int, int, int]],
                       properties: dict | None = None, object_type: str = "annotation") -> dict:
    """A GeoJSON FeatureCollection of named regions, as QuPath imports it (File > Import objects):
    one Feature per polygon, its class under ``properties.classification``; ``properties`` is added
    to every feature (QuPath keeps a feature's properties, not the collection's)."""
    features = []
    for name, found in regions.items():
        for polygon in found:
            rings = [_closed(polygon.exterior), *(_closed(hole) for hole in polygon.holes)]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                             "properties": {"objectType": object_type, "isLocked": False,
                                            "classification": {"name": name, "color": list(colours[name])},
                                            **(properties or {})}})
    return {"type": "FeatureCollection", "features": features}


def _closed(ring: list[tuple[float, float]]) -> list[list[float]]:
    return [[x, y] for x, y in [*ring, ring[0]]]


def proposers(path: Path) -> set[str]:
    """The model versions named as ``proposed_by`` on a GeoJSON's features (and the collection)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    found = set()
    if isinstance(doc, dict):
        found.add((doc.get("properties") or {}).get("proposed_by"))
        for feature in doc.get("features") or []:
            if isinstance(feature, dict) and isinstance(feature.get("properties"), dict):
                found.add(feature["properties"].get("proposed_by"))
    return {f for f in found if isinstance(f, str) and f}


def annotation_record(raw: Path, geojson_of: dict[Path, Path], folder: str | Path) -> str:
    """``annotations.json``: each slide's annotation file and who proposed the masks in them."""
    folder = Path(folder)
    proposed = set()
    if (folder / PROVENANCE).is_file():
        value = json.loads((folder / PROVENANCE).read_text()).get("proposed_by")
        proposed.update(value if isinstance(value, list) else [value] if value else [])
    for geojson in geojson_of.values():
        proposed |= proposers(geojson)
    files = {slide.relative_to(raw).as_posix(): geojson.relative_to(folder.resolve()).as_posix()
             for slide, geojson in sorted(geojson_of.items())}
    return json.dumps({"files": files, "proposed_by": sorted(proposed)}, indent=2)


def proposed_by_of(data: str | Path) -> str:
    """The model versions that proposed the annotations of the dataset holding ``data`` (a split),
    comma-separated; empty when its annotations came from no model."""
    root = dataset_root(Path(data).resolve()) if "://" not in str(data) else None
    if root is None or not (root / ANNOTATIONS).is_file():
        return ""
    return ",".join(json.loads((root / ANNOTATIONS).read_text()).get("proposed_by", []))