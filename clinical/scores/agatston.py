"""Agatston coronary calcium score (Agatston et al., JACC 1990), lesion by lesion.

On each slice, candidate pixels are those of at least 130 HU inside the region the score may count
(the head's predicted lesion mask, or a given region in threshold-only mode). Candidates that
touch, sides or corners (8-connectivity), make one lesion; a lesion of under 1 mm² is noise and is
not counted. A lesion scores its area in mm² times the weight of its peak: 130-199 HU 1, 200-299
HU 2, 300-399 HU 3, 400 HU and above 4. The score was defined on 3 mm slices: a slice of another
thickness counts ``thickness / 3`` of its lesions' scores, so a lesion seen on two 1.5 mm slices
scores as on one 3 mm slice. The total is the sum over lesions and slices; its risk category is
that of the paper's Table 3 (0-10, 11-100, 101-400, over 400).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from clinical.scores import ScoredSlice, ScoreResult

NAME = "agatston"
CATEGORIES = ("0-10", "11-100", "101-400", ">400")
THRESHOLD_HU = 130.0
MIN_AREA_MM2 = 1.0
REFERENCE_THICKNESS_MM = 3.0
# Lower bound of each weight's peak HU band.
WEIGHTS = ((400.0, 4), (300.0, 3), (200.0, 2), (THRESHOLD_HU, 1))
EIGHT_CONNECTED = np.ones((3, 3), bool)


def weight(peak_hu: float) -> int:
    return next((w for low, w in WEIGHTS if peak_hu >= low), 0)


def category(total: float) -> str:
    for upper, name in ((10, "0-10"), (100, "11-100"), (400, "101-400")):
        if total <= upper:
            return name
    return ">400"


def slice_lesions(s: ScoredSlice) -> list[dict]:
    """The counted lesions of one slice."""
    labels, count = ndimage.label((s.hu >= THRESHOLD_HU) & s.region, structure=EIGHT_CONNECTED)
    if not count:
        return []
    index = np.arange(1, count + 1)
    pixels = ndimage.sum_labels(np.ones_like(labels), labels, index)
    peaks = ndimage.maximum(s.hu, labels, index)
    boxes = ndimage.find_objects(labels)
    pixel_mm2 = s.pixel_spacing[0] * s.pixel_spacing[1]
    factor = s.thickness / REFERENCE_THICKNESS_MM
    lesions = []
    for n, peak, (rows, cols) in zip(pixels, peaks, boxes):
        area = float(n) * pixel_mm2
        if area < MIN_AREA_MM2:
            continue
        w = weight(float(peak))
        lesions.append({"slice": s.index, "position_mm": s.position, "top": rows.start, "left": cols.start,
                        "bottom": rows.stop, "right": cols.stop, "pixels": int(n), "area_mm2": round(area, 4),
                        "peak_hu": float(peak), "weight": w, "score": area * w * factor})
    return lesions


def score(slices: Iterable[ScoredSlice]) -> ScoreResult:
    lesions = [lesion for s in slices for lesion in slice_lesions(s)]
    total = float(sum(lesion["score"] for lesion in lesions))
    return ScoreResult(NAME, total, category(total), lesions,
                       {"threshold_hu": THRESHOLD_HU, "min_area_mm2": MIN_AREA_MM2,
                        "reference_thickness_mm": REFERENCE_THICKNESS_MM, "connectivity": 8})
