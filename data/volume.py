"""A CT series as a volume in patient geometry, for inference and scoring: its slices in
anatomical order with pixel spacing, slice thickness and positions as ingestion reads them
(``data.dicom``, ``data.readers.ct_series.order_series``), and their Hounsfield units read a few slices at a
time, so a series of any length holds a handful of slices in memory.

A series that cannot be one volume is refused with the file and the reason: slices that differ in
size, spacing, orientation or thickness, two slices at one position, a gap (a slice missing from
the export, which would silently drop lesions from a score), no pixel spacing (areas in mm² need
it), or several series in one folder without saying which.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.dicom import CTSlice, read_ct
from data.inputs import IngestError, Skipped
from data.listing import source_files
from data.readers.ct_series import CTPlan, ct_objects, order_series, series_gap


@dataclass(frozen=True)
class CTVolume:
    slices: list[CTSlice]  # in anatomical order (position along the slice normal)
    series_uid: str
    skipped: list[Skipped]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return self.slices[0].pixel_spacing  # (row, column) mm; checked equal across the series

    @property
    def positions(self) -> list[float]:
        return [s.along_normal for s in self.slices] if self.slices[0].along_normal is not None else []

    @property
    def spacing(self) -> float | None:
        """Median distance between slice centres (mm)."""
        positions = self.positions
        return float(np.median(np.diff(positions))) if len(positions) > 1 else None

    @property
    def thickness(self) -> float:
        """Slice thickness (mm): the header's, else the spacing between slices."""
        return self.slices[0].slice_thickness or self.spacing or 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.slices), self.slices[0].rows, self.slices[0].columns

    def geometry(self) -> dict:
        first = self.slices[0]
        return {"series_uid": self.series_uid, "slices": len(self.slices), "rows": first.rows, "columns": first.columns,
                "pixel_spacing_mm": list(self.pixel_spacing), "slice_thickness_mm": first.slice_thickness,
                "slice_spacing_mm": self.spacing, "orientation": list(first.orientation or []),
                "first_position_mm": list(first.position or []), "last_position_mm": list(self.slices[-1].position or []),
                "kernel": first.kernel}

    def hu(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, Hounsfield units) of each slice in order; a file's frames are read once."""
        cached: tuple[str, list] | None = None
        for index, info in enumerate(self.slices):
            if cached is None or cached[0] != info.path:
                cached = (info.path, read_ct(info.path))
            yield index, cached[1][info.frame].hu


def read_series(folder: str | Path, series_uid: str | None = None) -> CTVolume:
    """The one CT series under ``folder`` (or ``series_uid`` among several), checked to be one
    volume with no missing slice. Files that are not CT images (reports, scouts, a DICOMDIR) are
    skipped with their reason, as at ingestion."""
    folder = Path(folder)
    files, hidden = source_files(folder)
    objects, skipped, errors = ct_objects(folder, files)
    if errors:  # a slice that should be read and cannot: a score over the rest would miss it
        raise errors[0]
    skipped = hidden + skipped
    by_series: dict[str, list[CTSlice]] = {}
    for info in (info for infos in objects.values() for info in infos):
        by_series.setdefault(info.series_uid or str(folder), []).append(info)
    if not by_series:
        raise IngestError(folder, f"no CT image among its {len(files)} file(s)"
                                  + (f"; e.g. {skipped[0]}" if skipped else ""))
    if series_uid is None and len(by_series) > 1:
        listed = ", ".join(f"{uid} ({len(s)} slices)" for uid, s in by_series.items())
        raise IngestError(folder, f"holds {len(by_series)} CT series ({listed}); name one (--series <uid>)")
    uid = series_uid or next(iter(by_series))
    if uid not in by_series:
        raise IngestError(folder, f"no series {uid}; it holds {', '.join(by_series)}")
    ordered = order_series(by_series[uid], CTPlan())
    if (gap := series_gap(ordered)) is not None:
        raise IngestError(gap[0].path, f"series {uid}: {gap[1]}; a slice is missing from the export, and a score "
                                       "over the rest would miss what it held")
    if ordered[0].pixel_spacing is None:
        raise IngestError(ordered[0].path, f"series {uid}: no Pixel Spacing; areas in mm² cannot be computed")
    return CTVolume(ordered, uid, skipped)
