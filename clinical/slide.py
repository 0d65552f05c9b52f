"""A registered head over a whole slide: the slide is tiled as the model's training data was
(``data.tiling.Tiling`` from its lineage), tiles stream through backbone and head in batches, and
what people open is written to a folder:

- ``tiles.csv``: one row per tile, level-0 x, y and side, tissue fraction, the class and every
  class's probability, the regression value, the area fraction of each segmented class;
- ``heatmap.png`` (classes), ``heatmap_<target>.png`` (the regression) and ``segmentation.png``
  over the slide's thumbnail, with a legend;
- ``summary.json``: the slide's aggregates (tiles and tissue area, class fractions, sum and mean
  of the regression, segmented area per class);
- ``regions.geojson`` (adjacent tiles of a class merged into polygons) and ``segmentation.geojson``
  (the segmentation head's masks vectorised), FeatureCollections in level-0 pixels that QuPath
  imports (File > Import objects) and ``data.ingest --annotations`` reads back.

Memory is bounded by the tile grid, not the tiles: rows are written as they come, and the maps are
one cell per tile (one per patch for segmentation).
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.annotations import BACKGROUND, feature_collection
from data.inputs import file_md5
from data.tiling import Tiling, TilingError
from data.vectorize import polygons
from data.wsi import SlideTile, TilePlan, open_slide, thumbnail, tile_slide
from dinomx.inference import TilePredictor

log = logging.getLogger(__name__)
TABLE, SUMMARY, REGIONS, SEGMENTS = "tiles.csv", "summary.json", "regions.geojson", "segmentation.geojson"
HEATMAP, SEGMENTATION_MAP = "heatmap.png", "segmentation.png"
# Longest side of the maps drawn over the slide's thumbnail.
THUMBNAIL_SIDE = 2048
# The maps are photographs with colour over them: zlib's fastest level writes them in 0.6x the
# time for 15 % more bytes (a 1532 x 2048 heatmap: 0.23 s against 0.38 s).
PNG = {"compress_level": 1}
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def colours(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(classes)}


@dataclass
class _Grid:
    """The slide's tile grid and what has been predicted on it so far."""

    size: int  # level-0 side of a grid tile
    rows: int
    cols: int
    classes: list[str]
    segment_classes: list[str]
    ratio: float  # grid magnification / model magnification: how much wider the model's field is
    label: np.ndarray = field(init=False)  # class index per cell, -1 where no tile
    confidence: np.ndarray = field(init=False)
    value: np.ndarray = field(init=False)
    mosaic: np.ndarray | None = None  # segment class per patch, over the whole grid
    tiles: int = 0
    class_counts: np.ndarray = field(init=False)
    probability_sums: np.ndarray = field(init=False)
    segment_counts: np.ndarray = field(init=False)

    def __post_init__(self):
        self.label = np.full((self.rows, self.cols), -1, np.int16)
        self.confidence = np.zeros((self.rows, self.cols), np.float32)
        self.value = np.full((self.rows, self.cols), np.nan, np.float32)
        self.class_counts = np.zeros(len(self.classes), np.int64)
        self.probability_sums = np.zeros(len(self.classes))
        self.segment_counts = np.zeros(len(self.segment_classes), np.int64)


def _cell_segments(segments: np.ndarray, ratio: float) -> np.ndarray:
    """The patches of a model tile that cover its grid cell: all of them when the model sees the
    grid's magnification, the central 1/ratio of the field (sampled at patch centres) when it sees
    a wider one."""
    if ratio == 1:
        return segments
    h, w = segments.shape
    rows = np.floor((0.5 - 0.5 / ratio + (np.arange(h) + 0.5) / (h * ratio)) * h).astype(int)
    cols = np.floor((0.5 - 0.5 / ratio + (np.arange(w) + 0.5) / (w * ratio)) * w).astype(int)
    return segments[np.ix_(rows, cols)]


def _add(grid: _Grid, tiles: list[SlideTile], predicted, writer: csv.writer) -> None:
    for index, tile in enumerate(tiles):
        row, col = tile.y // grid.size, tile.x // grid.size
        record = [tile.x, tile.y, tile.size, round(tile.tissue_fraction, 4)]
        if predicted.probabilities is not None:
            p = predicted.probabilities[index]
            best = int(p.argmax())
            grid.label[row, col], grid.confidence[row, col] = best, p[best]
            grid.class_counts[best] += 1
            grid.probability_sums += p
            record += [grid.classes[best], round(float(p[best]), 4), *(round(float(v), 4) for v in p)]
        if predicted.values is not None:
            value = float(predicted.values[index])
            grid.value[row, col] = value
            record.append(round(value, 6))
        if predicted.segments is not None:
            cell = _cell_segments(predicted.segments[index], grid.ratio)
            if grid.mosaic is None:
                grid.mosaic = np.zeros((grid.rows * cell.shape[0], grid.cols * cell.shape[1]), np.uint8)
            h, w = cell.shape
            grid.mosaic[row * h:(row + 1) * h, col * w:(col + 1) * w] = cell
            counts = np.bincount(cell.ravel(), minlength=len(grid.segment_classes))
            grid.segment_counts += counts
            record += [round(float(c) / cell.size, 4) for c in counts]
        writer.writerow(record)
        grid.tiles += 1


def _header(predictor: TilePredictor) -> list[str]:
    header = ["x", "y", "size", "tissue_fraction"]
    if predictor.classes:
        header += ["label", "confidence", *(f"p_{c}" for c in predictor.classes)]
    if predictor.target:
        header.append(predictor.target)
    header += [f"area_{c}" for c in predictor.segment_classes]
    return header


def _overlay(base: Image.Image, cells: np.ndarray, grid: _Grid, downsample: float, legend: list[tuple[str, tuple]],
             title: str) -> Image.Image:
    """``cells`` (an RGBA raster over the whole grid, a cell per tile or per patch) laid over the
    thumbnail where the grid is, with a legend below."""
    extent = (max(1, round(grid.cols * grid.size / downsample)), max(1, round(grid.rows * grid.size / downsample)))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    layer.paste(Image.fromarray(cells, "RGBA").resize(extent, Image.Resampling.NEAREST), (0, 0))
    picture = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    line = 14
    canvas = Image.new("RGB", (max(picture.width, 240), picture.height + line * (len(legend) + 1) + 6), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, picture.height + 3), title, fill="black")
    for i, (name, colour) in enumerate(legend):
        top = picture.height + 3 + line * (i + 1)
        draw.rectangle((4, top + 2, 14, top + 11), fill=tuple(colour))
        draw.text((20, top), name, fill="black")
    return canvas


def _maps(grid: _Grid, base: Image.Image, downsample: float, out: Path, target: str | None) -> list[str]:
    written = []
    present = grid.label >= 0
    if grid.classes:
        palette = np.asarray([*PALETTE] * (len(grid.classes) // len(PALETTE) + 1), np.uint8)[:len(grid.classes)]
        cells = np.zeros((*grid.label.shape, 4), np.uint8)
        cells[present, :3] = palette[grid.label[present]]
        cells[present, 3] = (60 + 140 * grid.confidence[present]).astype(np.uint8)
        legend = [(name, tuple(palette[i])) for i, name in enumerate(grid.classes)]
        _overlay(base, cells, grid, downsample, legend, "class of each tile (opacity: confidence)").save(out / HEATMAP, **PNG)
        written.append(HEATMAP)
    if target:
        finite = ~np.isnan(grid.value)
        low, high = (float(np.nanmin(grid.value)), float(np.nanmax(grid.value))) if finite.any() else (0.0, 1.0)
        scaled = np.clip((np.nan_to_num(grid.value, nan=low) - low) / ((high - low) or 1.0), 0, 1)
        cells = np.zeros((*grid.value.shape, 4), np.uint8)
        # Blue (low) to red (high).
        cells[..., 0], cells[..., 2] = (255 * scaled).astype(np.uint8), (255 * (1 - scaled)).astype(np.uint8)
        cells[finite, 3] = 170
        name = f"heatmap_{target}.png"
        legend = [(f"{low:.3g} (low)", (0, 0, 255)), (f"{high:.3g} (high)", (255, 0, 0))]
        _overlay(base, cells, grid, downsample, legend, f"{target} of each tile").save(out / name, **PNG)
        written.append(name)
    if grid.mosaic is not None:
        palette = np.asarray([(0, 0, 0), *PALETTE] * (len(grid.segment_classes) // len(PALETTE) + 1), np.uint8)
        cells = np.zeros((*grid.mosaic.shape, 4), np.uint8)
        cells[..., :3] = palette[grid.mosaic]
        cells[..., 3] = np.where(grid.mosaic > 0, 170, 0)
        legend = [(name, tuple(palette[i])) for i, name in enumerate(grid.segment_classes) if i]
        _overlay(base, cells, grid, downsample, legend, "segmentation").save(out / SEGMENTATION_MAP, **PNG)
        written.append(SEGMENTATION_MAP)
    return written


def _regions(labels: np.ndarray, classes: list[str], scale: tuple[float, float], properties: dict) -> dict:
    """Polygons of each class (background left out) in level-0 pixels of a raster whose cell is
    ``scale`` level-0 pixels wide and high."""
    sx, sy = scale
    found = {name: [p.mapped(lambda x, y: (x * sx, y * sy)) for p in polygons(labels == index)]
             for index, name in enumerate(classes) if name != BACKGROUND}
    return feature_collection({k: v for k, v in found.items() if v}, colours(classes), properties)


def _summary(grid: _Grid, target: str | None, mpp: float | None) -> dict:
    tile_mm2 = (grid.size * mpp / 1000) ** 2 if mpp else None
    summary = {"tiles": grid.tiles, "tile_side_level0": grid.size,
               "tissue_area_mm2": round(grid.tiles * tile_mm2, 4) if tile_mm2 else None}
    if grid.classes and grid.tiles:
        summary["class_fractions"] = {c: round(float(n) / grid.tiles, 4) for c, n in zip(grid.classes, grid.class_counts)}
        summary["class_tiles"] = {c: int(n) for c, n in zip(grid.classes, grid.class_counts)}
        summary["mean_probabilities"] = {c: round(float(v) / grid.tiles, 4)
                                         for c, v in zip(grid.classes, grid.probability_sums)}
    if target and grid.tiles:
        values = grid.value[~np.isnan(grid.value)].astype(np.float64)
        summary["regression"] = {"target": target, "sum": float(values.sum()), "mean": float(values.mean()),
                                 "min": float(values.min()), "max": float(values.max())}
    if grid.mosaic is not None:
        total = grid.segment_counts.sum()
        summary["segmentation"] = {"fractions": {c: round(float(n) / total, 4)
                                                 for c, n in zip(grid.segment_classes, grid.segment_counts)}}
        if tile_mm2:
            cells_per_tile = total / grid.tiles
            summary["segmentation"]["area_mm2"] = {c: round(float(n) / cells_per_tile * tile_mm2, 4)
                                                   for c, n in zip(grid.segment_classes, grid.segment_counts)}
    return summary


def predict_slide(path: str | Path, predictor: TilePredictor, tiling: Tiling, out: str | Path,
                  batch_size: int = 32, provenance: dict | None = None) -> dict:
    """Run ``predictor`` over every tissue tile of the slide at ``path`` as ``tiling`` cuts it and
    write the outputs (module docstring) to ``out``, which appears whole or not at all. Returns
    the summary; ``provenance`` (the model's URI, ...) goes into it and onto every GeoJSON feature."""
    if tiling.modality != "he":
        raise TilingError(f"the model was trained on {tiling.modality} images, not slide tiles: "
                          "predict a CT series with it instead")
    path, out = Path(path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    md5 = file_md5(path)
    slide, info = open_slide(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plan = TilePlan(tiling.magnifications, tiling.tile_size, tiling.min_tissue)
        size = round(plan.tile_size * info.objective_power / plan.magnifications[0])
        grid = _Grid(size, max(0, (info.height - size) // size + 1), max(0, (info.width - size) // size + 1),
                     predictor.classes, predictor.segment_classes, plan.magnifications[0] / tiling.magnification)
        with open(staging / TABLE, "w", newline="") as table:
            writer = csv.writer(table)
            writer.writerow(_header(predictor))
            batch: list[SlideTile] = []
            for tile in tile_slide(slide, info, plan, read=(tiling.magnification,)):
                batch.append(tile)
                if len(batch) == batch_size:
                    _add(grid, batch, predictor([t.images[tiling.magnification] for t in batch]), writer)
                    batch = []
                    if grid.tiles % (batch_size * 50) == 0:
                        log.info("%s: %d tiles (%.1f/s)", path.name, grid.tiles, grid.tiles / (time.monotonic() - started))
            if batch:
                _add(grid, batch, predictor([t.images[tiling.magnification] for t in batch]), writer)
        if not grid.tiles:
            raise TilingError(f"{path}: no {plan.tile_size} px tile at {plan.magnifications[0]:g}x has tissue above "
                              f"min_tissue={plan.min_tissue:g} (the model's tiling); is this slide blank?")
        downsample = max(info.width, info.height) / min(THUMBNAIL_SIDE, max(info.width, info.height))
        base = thumbnail(slide, downsample)
        base.save(staging / "thumbnail.png", **PNG)
        maps = _maps(grid, base, downsample, staging, predictor.target)
        properties = {"source_md5": md5, **(provenance or {}),
                      **({"proposed_by": provenance["model"]} if provenance and provenance.get("model") else {})}
        if grid.classes:
            regions = _regions(grid.label.astype(np.int32), grid.classes, (size, size), properties)
            (staging / REGIONS).write_text(json.dumps(regions))
        if grid.mosaic is not None:
            per_patch = (size / (grid.mosaic.shape[1] / grid.cols), size / (grid.mosaic.shape[0] / grid.rows))
            segments = _regions(grid.mosaic.astype(np.int32), grid.segment_classes, per_patch, properties)
            (staging / SEGMENTS).write_text(json.dumps(segments))
        summary = {"slide": path.name, "md5": md5, **(provenance or {}),
                   "scan": {"width": info.width, "height": info.height, "objective_power": info.objective_power,
                            "mpp": info.mpp, "vendor": info.vendor},
                   "tiling": json.loads(tiling.to_json()), **_summary(grid, predictor.target, info.mpp),
                   "maps": maps, "seconds": round(time.monotonic() - started, 2)}
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2))
        staging.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        log.info("%s: %d tiles in %.1f s -> %s", path.name, grid.tiles, summary["seconds"], out)
        return summary
    finally:
        slide.close()
        shutil.rmtree(staging, ignore_errors=True)


def slide_summary_line(summary: dict) -> str:
    """The aggregate a person reads first, in one line."""
    parts = [f"{summary['slide']}: {summary['tiles']} tiles"]
    if summary.get("tissue_area_mm2"):
        parts[0] += f" ({summary['tissue_area_mm2']:.2f} mm² of tissue)"
    if fractions := summary.get("class_fractions"):
        parts.append(", ".join(f"{c} {f:.0%}" for c, f in sorted(fractions.items(), key=lambda kv: -kv[1])))
    if regression := summary.get("regression"):
        parts.append(f"{regression['target']}: sum {regression['sum']:.4g}, mean {regression['mean']:.4g} per tile")
    if segmentation := summary.get("segmentation"):
        parts.append("segmented " + ", ".join(f"{c} {f:.0%}" for c, f in segmentation["fractions"].items()))
    return "; ".join(parts)
