"""CT from DICOM (pydicom): what an export holds, stored values to Hounsfield units, series.

Classic CT carries Rescale Slope/Intercept at the top level; Enhanced CT carries them in the
Pixel Value Transformation functional group, per frame or shared by all frames. Pixel padding
(the area outside the reconstruction circle) is set to air, not read as tissue, and so is any
value below air (a -2000 ring without a Pixel Padding Value, ringing of lossy JPEG 2000); values
above ``HU_CEILING`` (metal on an extended-scale scanner) are set to it. The fractions clamped
are recorded per slice.

A hospital export holds more than CT slices: ``describe`` reads headers only and tells images
from what is skipped (DICOMDIR, structured reports, SEG/RT objects, secondary captures such as
dose reports, scouts) and from what is refused (an image of another modality, a truncated file,
a compression no installed decoder reads).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from data.inputs import IngestError, Skipped
from dinomx.errors import DataError
from dinomx.images import window_hu

AIR_HU = -1024.0
# The top of the standard 12-bit CT scale. Extended-scale scanners record metal (fillings,
# implants) up to tens of thousands of HU; above this no window shows anything, so those pixels
# are clipped here and their fraction recorded, and one implant does not fail a dataset.
HU_CEILING = 3071.0
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 to .7.4
# CT Image Storage, Enhanced CT Image Storage, Legacy Converted Enhanced CT Image Storage: an object
# of these classes without pixel data was cut short, it is not some other kind of object.
CT_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
# Modalities of objects that are not images to train on.
NOT_IMAGE_MODALITIES = {
    "SR": "a structured report", "SEG": "a segmentation", "RTSTRUCT": "RT structures", "RTPLAN": "an RT plan",
    "RTDOSE": "an RT dose grid", "RTRECORD": "an RT treatment record", "PR": "a presentation state",
    "KO": "a key object selection", "DOC": "an encapsulated document", "REG": "a registration",
    "FID": "fiducials", "PLAN": "a plan", "AU": "audio", "ECG": "a waveform", "HD": "a waveform",
}


@dataclass(frozen=True)
class CTSlice:
    """One frame of a CT image file, from its header: enough to group, order and check series."""
    path: str
    frame: int  # index within the file (0 for single-frame CT)
    frames: int
    patient_id: str
    series_uid: str
    sop_uid: str
    instance: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # mm, (row, column)
    slice_thickness: float | None  # mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    kernel: str
    description: str
    burned_in: bool = False  # BurnedInAnnotation YES: text in the pixels, a name or date perhaps

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        return np.cross(np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]))

    @property
    def along_normal(self) -> float | None:
        """Position along the slice normal: what orders a series (instance numbers may not)."""
        normal = self.normal
        return None if normal is None or self.position is None else float(np.dot(normal, self.position))


@dataclass
class CTFrame:
    info: CTSlice
    hu: np.ndarray  # float32 (rows, columns), Hounsfield units
    padding_fraction: float
    below_air_fraction: float  # values below air set to air
    above_ceiling_fraction: float  # values above HU_CEILING set to it


def _functional_group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of ``sequence`` that applies to ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame and frame < len(per_frame) else None, shared[0] if shared else None):
        if group is not None and sequence in group and group[sequence].value:
            return group[sequence].value[0]
    return None


def _from_group(ds: Dataset, frame: int, sequence: str, keyword: str):
    item = _functional_group(ds, frame, sequence)
    source = item if item is not None and keyword in item else ds
    return source.get(keyword)


def _rescale(ds: Dataset, frame: int, path: str) -> tuple[float, float]:
    item = _functional_group(ds, frame, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    if "RescaleSlope" not in source or "RescaleIntercept" not in source:
        raise IngestError(path, f"frame {frame}: no Rescale Slope/Intercept (top level or Pixel Value "
                                "Transformation functional group); Hounsfield units cannot be computed")
    return float(source.RescaleSlope), float(source.RescaleIntercept)


def _padding(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Mask of padded pixels: Pixel Padding Value, or the range it spans with Pixel Padding Range Limit."""
    if "PixelPaddingValue" not in ds:
        return np.zeros(stored.shape, dtype=bool)
    value = int(ds.PixelPaddingValue)
    limit = int(ds.get("PixelPaddingRangeLimit", value))
    low, high = min(value, limit), max(value, limit)
    return (stored >= low) & (stored <= high)


def _dcmread(path: str) -> Dataset:
    """Read a DICOM file, also one written without the 128-byte preamble (common from older PACS).
    A file with the DICOM preamble that does not parse is truncated or corrupt (refused); one
    without it that does not parse as DICOM is another kind of file (skipped)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise IngestError(path, "empty file (0 bytes)")
    preamble = head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not preamble)
    except Exception as exc:  # parsers fail in format-specific ways
        if preamble:
            raise IngestError(path, f"DICOM file truncated or corrupt ({type(exc).__name__}: {exc})") from None
        raise Skipped(path, "not a DICOM file") from None
    # pydicom reads a file cut short without an error: it warns and returns what it has (for a cut
    # compressed image, not even its Modality).
    ended = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if preamble and ended:
        raise IngestError(path, f"DICOM file truncated or corrupt ({ended[0]})")
    if "SOPClassUID" not in ds and "Modality" not in ds and "MediaStorageSOPClassUID" not in getattr(ds, "file_meta", {}):
        if preamble:
            raise IngestError(path, "DICOM file truncated or corrupt: its header ends before SOP Class and Modality")
        raise Skipped(path, "not a DICOM file (no DICOM header, SOP Class or Modality)")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # Older PACS write the data set alone, without file meta: its encoding is what parsing
        # found (implicit VR little endian, the DICOM default, in practice); pixel data is native.
        implicit, little = ds.original_encoding
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _text(value) -> str:
    """A text element as one string, a multi-valued one joined as DICOM stores it (``B30f\\H``)."""
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list) else str(value)


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _values_as_stored(read):
    """Values are read as stored, unvalidated: anonymisers write UIDs that are not valid DICOM
    UIDs (hashes), which only group and name slices here, and pydicom would warn and log each one
    at every read of every file."""
    @functools.wraps(read)
    def reading(*args, **kwargs):
        previous = pydicom.config.settings.reading_validation_mode
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        try:
            return read(*args, **kwargs)
        finally:
            pydicom.config.settings.reading_validation_mode = previous
    return reading


@_values_as_stored
def describe(path: str | Path) -> list[CTSlice]:
    """The CT frames of a file from its header (pixel data read, not decoded). ``Skipped`` for what is not a CT image to
    train on, ``IngestError`` for a file that should be one and cannot be read."""
    # The whole file is read (its pixel data not decoded): a file cut short shows only so.
    return _slices(_dcmread(str(path)), str(path))


def _slices(ds: Dataset, path: str) -> list[CTSlice]:
    sop = str(ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop == MEDIA_STORAGE_DIRECTORY or Path(path).name.upper() == "DICOMDIR":
        raise Skipped(path, "DICOMDIR: the export's index of files, not an image")
    modality = ds.get("Modality")
    if modality in NOT_IMAGE_MODALITIES:
        raise Skipped(path, f"modality {modality} ({NOT_IMAGE_MODALITIES[modality]}), not an image")
    if sop.startswith(SECONDARY_CAPTURE):
        raise Skipped(path, f"secondary capture (SOP Class {sop}: a screenshot or dose report), not a CT acquisition")
    has_pixels = any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS)
    if modality is None and not has_pixels:
        raise IngestError(path, "DICOM file truncated or corrupt: it ends before its Modality and pixel data")
    if modality is None:
        raise IngestError(path, "modality is missing, expected CT")
    if modality != "CT":  # a study's export holds its other series too (MR, PET, ...): theirs to use, not a fault
        raise Skipped(path, f"modality {modality}, not CT (this dataset ingests CT)")
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        raise Skipped(path, "scout/localizer (ImageType LOCALIZER), not a diagnostic slice")
    if not has_pixels:
        if sop in CT_IMAGE_CLASSES:
            raise IngestError(path, f"DICOM file truncated or corrupt: a CT image (SOP Class {sop}) that ends before its "
                                    "pixel data; copy the file again from the source")
        raise Skipped(path, "no pixel data (not an image object)")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise IngestError(path, f"{samples} samples per pixel; CT slices must be single-channel")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for frame in range(frames):
        spacing = _from_group(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        thickness = _from_group(ds, frame, "PixelMeasuresSequence", "SliceThickness")
        out.append(CTSlice(
            path=path, frame=frame, frames=frames,
            patient_id=str(ds.get("PatientID", "")), series_uid=str(ds.get("SeriesInstanceUID", "")),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            instance=int(ds.get("InstanceNumber", 0) or 0),
            rows=int(ds.get("Rows", 0)), columns=int(ds.get("Columns", 0)),
            pixel_spacing=_floats(spacing, 2) if spacing else None,
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            orientation=_floats(_from_group(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            position=_floats(_from_group(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3),
            kernel=_text(_from_group(ds, frame, "CTReconstructionSequence", "ConvolutionKernel")),
            description=str(ds.get("SeriesDescription", "")),
            burned_in=str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES",
        ))
    return out


def _check_decoder(ds: Dataset, path: str) -> None:
    """A compressed file whose codec is not installed gets its own message, not "corrupt"."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise IngestError(path, f"no DICOM decoder exists for its transfer syntax {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        raise IngestError(path, f"the decoder for its transfer syntax {syntax.name} ({syntax}) is not installed "
                                f"(it needs one of: {'; '.join(decoder.missing_dependencies)})")


def _check_length(ds: Dataset, path: str) -> None:
    """Native pixel data shorter than its header says: the file was cut short (a copy that stopped)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return
    expected = (int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("BitsAllocated", 16)) // 8)
    held = len(ds.PixelData)
    if held < expected:
        raise IngestError(path, f"pixel data unreadable, file truncated: it holds {held} of the {expected} bytes its "
                                f"header announces ({ds.get('Rows')}x{ds.get('Columns')} pixels, "
                                f"{ds.get('BitsAllocated')} bits); copy the file again from the source")


@_values_as_stored
def read_ct(path: str | Path) -> list[CTFrame]:
    """Every frame of a CT DICOM file in Hounsfield units (``describe`` first for what it refuses
    or skips); damaged pixel data and non-finite values are refused with the reason."""
    path = str(path)
    ds = _dcmread(path)
    infos = _slices(ds, path)
    _check_decoder(ds, path)
    _check_length(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about trailing padding bytes it drops
            stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise IngestError(path, f"pixel data unreadable, file truncated or corrupt ({type(exc).__name__}: {exc})") from None
    frames = stored if int(ds.get("NumberOfFrames", 1) or 1) > 1 else stored[None]
    out = []
    for index, values in enumerate(frames):
        slope, intercept = _rescale(ds, index, path)
        hu = values.astype(np.float32) * slope + intercept
        bad = ~np.isfinite(hu)
        if bad.any():
            raise IngestError(path, f"frame {index}: {int(bad.sum())} NaN or infinite pixels")
        padded = _padding(ds, values)
        hu[padded] = AIR_HU
        below, above = hu < AIR_HU, hu > HU_CEILING
        hu[below], hu[above] = AIR_HU, HU_CEILING
        out.append(CTFrame(info=infos[index], hu=hu, padding_fraction=float(padded.mean()),
                           below_air_fraction=float(below.mean()), above_ceiling_fraction=float(above.mean())))
    return out


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """An 8-bit single-channel slice through a CT window (e.g. soft tissue: 40 / 400)."""
    if width <= 0:
        raise DataError(f"window width must be positive, got {width}")
    return (window_hu(hu, center, width) * 255).round().astype(np.uint8)
