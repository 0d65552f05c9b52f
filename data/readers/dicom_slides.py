"""DICOM whole-slide images in an export: a slide is a series of files (its levels and associated
images) in one folder, found by its largest VOLUME image."""
from __future__ import annotations

from pathlib import Path

import pydicom

from data.inputs import IngestError, Skipped
from data.wsi import WHOLE_SLIDE_IMAGE


def dicom_slides(files: list[Path]) -> tuple[list[Path], dict[Path, list[Path]], list[Skipped], list[IngestError]]:
    """DICOM whole-slide images among ``files``: one slide per series in a folder (its levels and
    associated images are separate files), opened through its largest VOLUME image, which is
    how OpenSlide finds the rest. Returns (slides, files of each slide, skipped, refused)."""
    series, skipped, errors = {}, [], []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # parsers fail in format-specific ways
            errors.append(IngestError(path, f"DICOM file truncated or corrupt ({type(exc).__name__}: {exc})"))
            continue
        if str(ds.get("SOPClassUID", "")) != WHOLE_SLIDE_IMAGE:
            skipped.append(Skipped(path, f"DICOM, but not a whole-slide image (SOP Class {ds.get('SOPClassUID')})"))
            continue
        volume = "VOLUME" in [str(v).upper() for v in ds.get("ImageType", [])]
        size = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
        series.setdefault((path.parent, str(ds.get("SeriesInstanceUID", path))), []).append((volume, size, path))
    slides, members = [], {}
    for parts in series.values():
        volumes = sorted((size, path) for volume, size, path in parts if volume)
        if not volumes:
            skipped += [Skipped(path, "DICOM slide series without a VOLUME image") for _, _, path in parts]
            continue
        slides.append(volumes[-1][1])
        members[volumes[-1][1]] = sorted(path for _, _, path in parts)
    return slides, members, skipped, errors
