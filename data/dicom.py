"""CT from DICOM (pydicom): stored values to Hounsfield units, pixel padding, windowing.

Classic CT carries Rescale Slope/Intercept at the top level; Enhanced CT carries them in the
Pixel Value Transformation functional group, per frame or shared by all frames. Pixel padding
(the area outside the reconstruction circle) is set to air, not read as tissue.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from data.inputs import IngestError
from dinomx.augmentations import window_hu

AIR_HU = -1024.0
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class CTFrame:
    hu: np.ndarray  # float32 (rows, columns), Hounsfield units
    frame: int  # index within the file (0 for single-frame CT)
    pixel_spacing: tuple[float, float] | None  # mm, (row, column)
    slice_thickness: float | None  # mm
    padding_fraction: float
    patient_id: str
    series_uid: str
    instance: int


def _functional_group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of ``sequence`` that applies to ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame and frame < len(per_frame) else None, shared[0] if shared else None):
        if group is not None and sequence in group and group[sequence].value:
            return group[sequence].value[0]
    return None


def _rescale(ds: Dataset, frame: int, path: str) -> tuple[float, float]:
    item = _functional_group(ds, frame, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    if "RescaleSlope" not in source or "RescaleIntercept" not in source:
        raise IngestError(path, f"frame {frame}: no Rescale Slope/Intercept (top level or Pixel Value "
                                "Transformation functional group); Hounsfield units cannot be computed")
    return float(source.RescaleSlope), float(source.RescaleIntercept)


def _geometry(ds: Dataset, frame: int) -> tuple[tuple[float, float] | None, float | None]:
    item = _functional_group(ds, frame, "PixelMeasuresSequence")
    source = item if item is not None else ds
    spacing = source.get("PixelSpacing")
    thickness = source.get("SliceThickness")
    return (
        (float(spacing[0]), float(spacing[1])) if spacing else None,
        float(thickness) if thickness not in (None, "") else None,
    )


def _padding(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Mask of padded pixels: Pixel Padding Value, or the range it spans with Pixel Padding Range Limit."""
    if "PixelPaddingValue" not in ds:
        return np.zeros(stored.shape, dtype=bool)
    value = int(ds.PixelPaddingValue)
    limit = int(ds.get("PixelPaddingRangeLimit", value))
    low, high = min(value, limit), max(value, limit)
    return (stored >= low) & (stored <= high)


def _dcmread(path: str) -> Dataset:
    """Read a DICOM file, also one written without the 128-byte preamble (common from older PACS)."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except (EOFError, OSError) as exc:
        raise IngestError(path, f"not a readable DICOM file ({exc})") from exc
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds or "Modality" in ds:
            return ds
    except Exception:  # force=True on a non-DICOM file fails in parser-specific ways
        pass
    raise IngestError(path, "not a readable DICOM file (no DICOM header, no SOP Class or Modality)")


def read_ct(path: str | Path) -> list[CTFrame]:
    """Every frame of a CT DICOM file in Hounsfield units; anything that is not a single-channel
    CT image with finite pixels is refused with the reason."""
    path = str(path)
    ds = _dcmread(path)
    modality = ds.get("Modality")
    if modality != "CT":
        raise IngestError(path, f"modality is {modality or 'missing'}, expected CT")
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise IngestError(path, "no pixel data (not an image object)")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise IngestError(path, f"{samples} samples per pixel; CT slices must be single-channel")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about trailing padding bytes it drops
            stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise IngestError(path, f"pixel data unreadable, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    frames = stored if int(ds.get("NumberOfFrames", 1)) > 1 else stored[None]
    out = []
    for index, values in enumerate(frames):
        slope, intercept = _rescale(ds, index, path)
        hu = values.astype(np.float32) * slope + intercept
        bad = ~np.isfinite(hu)
        if bad.any():
            raise IngestError(path, f"frame {index}: {int(bad.sum())} NaN or infinite pixels")
        padded = _padding(ds, values)
        hu[padded] = AIR_HU
        spacing, thickness = _geometry(ds, index)
        out.append(CTFrame(
            hu=hu,
            frame=index,
            pixel_spacing=spacing,
            slice_thickness=thickness,
            padding_fraction=float(padded.mean()),
            patient_id=str(ds.get("PatientID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            instance=int(ds.get("InstanceNumber", 0) or 0),
        ))
    return out


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """An 8-bit single-channel slice through a CT window (e.g. soft tissue: 40 / 400)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return (window_hu(torch.from_numpy(hu), center, width) * 255).round().to(torch.uint8).numpy()
