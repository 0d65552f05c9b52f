"""A registered head and a score over a whole CT series: slices cut as the model's training data
was (the window or channels of its lineage's ``data.tiling.Tiling``), the head run per slice in
batches, and a score module (``clinical.scores``) turning per-slice outputs into the clinical
answer. Written to a folder:

- ``slices.csv``: per slice, its position, the class and probabilities, the regression value, the
  area fraction of each segmented class;
- ``lesions.csv``: the score's lesion list (for Agatston: slice, position, area, peak HU, weight,
  score), and ``lesions/slice_<n>.png``, each slice with counted lesions drawn over its window;
- ``summary.json``: the series' geometry, the score's total and category, aggregates.

Without a head the score runs in threshold-only mode over a given region (every pixel by default).
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clinical import scores
from clinical.scores import ScoredSlice
from clinical.slide import PALETTE
from data.dicom import window
from data.inputs import IngestError
from data.readers.ct_series import CTPlan, slice_image
from data.sources import folder_md5
from data.tiling import Tiling, TilingError
from data.volume import CTVolume, read_series
from dinomx.inference import TilePredictor

log = logging.getLogger(__name__)
SLICES, LESIONS, SUMMARY, REVIEW = "slices.csv", "lesions.csv", "summary.json", "lesions"
# The window lesions are drawn over for review (mediastinal).
REVIEW_WINDOW = (40.0, 400.0)


def _plan(tiling: Tiling) -> CTPlan:
    if tiling.modality != "ct":
        raise TilingError(f"the model was trained on {tiling.modality} tiles, not CT slices: predict a slide with it")
    return CTPlan(window=tuple(tiling.window), channels=tiling.channels,
                  **({"windows": tuple(map(tuple, tiling.windows))} if tiling.windows else {}))


def _region_source(region: np.ndarray | None, volume: CTVolume):
    """The threshold-only region of slice ``index``: a (rows, columns) mask for every slice, or
    (slices, rows, columns), checked against the series."""
    z, rows, cols = volume.shape
    if region is None:
        return lambda index: np.ones((rows, cols), bool)
    region = np.asarray(region, bool)
    if region.shape == (rows, cols):
        return lambda index: region
    if region.shape == (z, rows, cols):
        return lambda index: region[index]
    raise IngestError("region", f"shape {region.shape}; expected ({rows}, {cols}) or ({z}, {rows}, {cols}) for this series")


def _with_neighbours(volume: CTVolume) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(index, slice before, slice, slice after) in order; the edges repeat their own slice."""
    frames = volume.hu()
    previous, (index, current) = None, next(frames)
    for following in frames:
        yield index, previous if previous is not None else current, current, following[1]
        previous, (index, current) = current, following
    yield index, previous if previous is not None else current, current, current


def _masks(predicted, lesion_classes: list[int], size: tuple[int, int]) -> np.ndarray:
    """The head's lesion classes at slice resolution: each pixel takes the patch its centre is in."""
    grid = torch.as_tensor(np.isin(predicted.segments, lesion_classes), dtype=torch.float32)[:, None]
    return F.interpolate(grid, size=size, mode="nearest-exact")[:, 0].numpy() > 0.5


def _review(hu: np.ndarray, candidates: np.ndarray, lesions: list[tuple[int, dict]], path: Path) -> None:
    """The slice through a mediastinal window, candidate pixels in red, each counted lesion boxed
    in yellow (its ``top``/``left``/``bottom``/``right`` pixels) with its row number in ``lesions.csv``."""
    grey = window(hu, *REVIEW_WINDOW)
    picture = np.stack([grey] * 3, -1)
    picture[candidates] = PALETTE[3]
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    for number, lesion in lesions:
        box = (lesion["left"] - 1, lesion["top"] - 1, lesion["right"], lesion["bottom"])
        draw.rectangle(box, outline=(255, 230, 0))
        draw.text((box[2] + 2, box[1]), str(number), fill=(255, 230, 0))
    image.save(path)


class _Run:
    """One pass over a series: the head on batches of slices (rows of ``slices.csv`` as they
    come), and what the score may count on each slice."""

    def __init__(self, volume: CTVolume, predictor: TilePredictor | None, plan: CTPlan | None, region_of,
                 batch_size: int, writer: csv.writer, threshold: float | None):
        self.volume, self.predictor, self.plan, self.region_of = volume, predictor, plan, region_of
        self.threshold = threshold  # the score's candidate threshold (HU), drawn in the review images
        self.batch_size, self.writer = batch_size, writer
        self.segmentation = predictor is not None and predictor.heads is not None and predictor.heads.segmentation is not None
        self.lesion_classes = list(range(1, len(predictor.segment_classes))) if self.segmentation else []
        self.candidates: dict[int, np.ndarray] = {}  # packed bits of each slice's candidates, for review

    def header(self) -> list[str]:
        header, predictor = ["slice", "position_mm"], self.predictor
        if predictor is not None:
            header += [*(["label", "confidence", *(f"p_{c}" for c in predictor.classes)] if predictor.classes else []),
                       *([predictor.target] if predictor.target else []), *(f"area_{c}" for c in predictor.segment_classes)]
        return header

    def slices(self) -> Iterator[ScoredSlice]:
        batch = []
        for item in _with_neighbours(self.volume):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch: list) -> Iterator[ScoredSlice]:
        predictor, positions = self.predictor, self.volume.positions
        predicted = predictor([slice_image(self.plan, hu, before, after) for _, before, hu, after in batch]) \
            if predictor is not None else None
        masks = _masks(predicted, self.lesion_classes, batch[0][2].shape) if self.segmentation else None
        for n, (index, _, hu, _) in enumerate(batch):
            position = positions[index] if positions else None
            row = [index, position]
            if predicted is not None:
                if predicted.probabilities is not None:
                    p = predicted.probabilities[n]
                    row += [predictor.classes[int(p.argmax())], round(float(p.max()), 4), *np.round(p, 4).tolist()]
                if predicted.values is not None:
                    row.append(round(float(predicted.values[n]), 6))
                if predicted.segments is not None:
                    counts = np.bincount(predicted.segments[n].ravel(), minlength=len(predictor.segment_classes))
                    row += [round(float(c) / predicted.segments[n].size, 4) for c in counts]
            self.writer.writerow(row)
            region = masks[n] if masks is not None else self.region_of(index)
            if self.threshold is not None and (candidates := (hu >= self.threshold) & region).any():
                self.candidates[index] = np.packbits(candidates)
            yield ScoredSlice(index, position, hu, region, self.volume.pixel_spacing, self.volume.thickness)

    def review(self, lesions: list[dict], folder: Path) -> None:
        by_slice: dict[int, list[tuple[int, dict]]] = {}
        for number, lesion in enumerate(lesions):
            by_slice.setdefault(lesion["slice"], []).append((number, lesion))
        shape = self.volume.shape[1:]
        for index, hu in self.volume.hu():
            if index in by_slice:
                packed = self.candidates.get(index)
                candidates = (np.unpackbits(packed)[:shape[0] * shape[1]].reshape(shape).astype(bool) if packed is not None
                              else np.zeros(shape, bool))
                _review(hu, candidates, by_slice[index], folder / f"slice_{index:04d}.png")


def predict_series(source: str | Path, out: str | Path, predictor: TilePredictor | None = None,
                   tiling: Tiling | None = None, score: str | None = None, region: np.ndarray | None = None,
                   series_uid: str | None = None, batch_size: int = 16, provenance: dict | None = None) -> dict:
    """Run ``predictor`` (cut by ``tiling``) and ``score`` over the series in ``source`` (a folder of
    DICOM files) and write the outputs (module docstring) to ``out``, whole or not at all."""
    source, out = Path(source), Path(out)
    if predictor is None and score is None:
        raise TilingError("nothing to do: give a head, a score, or both")
    module = scores.get(score) if score else None
    plan = _plan(tiling) if predictor is not None else None
    if module is not None and predictor is not None and (predictor.heads is None or predictor.heads.segmentation is None):
        raise TilingError("the head has no segmentation probe, so it proposes no lesion mask for the score; fit one "
                          "(heads --masks) or score in threshold-only mode without a head")
    started = time.monotonic()
    volume = read_series(source, series_uid)
    region_of = _region_source(region, volume)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(staging / SLICES, "w", newline="") as table:
            writer = csv.writer(table)
            run = _Run(volume, predictor, plan, region_of, batch_size, writer,
                       getattr(module, "THRESHOLD_HU", float("-inf")) if module is not None else None)
            writer.writerow(run.header())
            if module is not None:
                result = module.score(run.slices())
            else:
                for _ in run.slices():
                    pass
        summary = {"series": volume.geometry(), "md5": folder_md5(source), **(provenance or {}),
                   "mode": "head" if predictor is not None else "threshold only",
                   "skipped": [{"source": s.path, "reason": s.reason} for s in volume.skipped]}
        if tiling is not None:
            summary["tiling"] = json.loads(tiling.to_json())
        if module is not None:
            summary["score"] = {"name": result.name, "total": round(result.total, 3), "category": result.category,
                                "categories": list(module.CATEGORIES), "lesions": len(result.lesions), **result.details}
            with open(staging / LESIONS, "w", newline="") as table:
                columns = list(result.lesions[0]) if result.lesions else ["slice", "score"]
                writer = csv.DictWriter(table, fieldnames=columns)
                writer.writeheader()
                writer.writerows(result.lesions)
            (staging / REVIEW).mkdir()
            run.review(result.lesions, staging / REVIEW)
        summary["seconds"] = round(time.monotonic() - started, 2)
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2))
        staging.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        return summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def series_summary_line(summary: dict) -> str:
    geometry = summary["series"]
    line = (f"series {geometry['series_uid']}: {geometry['slices']} slices of {geometry['rows']}x{geometry['columns']}, "
            f"{geometry['pixel_spacing_mm'][0]:g}x{geometry['pixel_spacing_mm'][1]:g} mm pixels, "
            f"{geometry['slice_thickness_mm']} mm thick")
    if score := summary.get("score"):
        line += f"; {score['name']} {score['total']:.1f} ({score['category']}) from {score['lesions']} lesion(s)"
    return line
