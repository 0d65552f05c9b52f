"""CT phantoms as real DICOM series, for trying and testing what reads a series (the calcium score):
pydicom's own CT_small slice (in its wheel) is the template of every header (Rescale Slope 1,
Intercept -1024), its pixels replaced by Hounsfield units chosen here.

    python -m data.phantoms calcium outputs/calcium

writes ``series/`` (8 slices of 64x64 pixels of 0.5 mm, 3 mm thick), ``heart.npy`` (the region
a threshold-only score counts in: the top 44 rows) and ``expected.json``. Its Agatston score,
worked out by hand (a pixel is 0.25 mm², slices are 3 mm so nothing is rescaled):

- slice 2: 4x4 pixels at 180 HU: 4 mm² x weight 1 = 4;
- slices 4 and 5: 6x6 pixels peaking at 350 HU: 9 mm² x 3 = 27 on each, 54;
- slice 6: 8x8 pixels at 450 HU: 16 mm² x 4 = 64;
- slice 3: 1x3 pixels at 500 HU, 0.75 mm²: under 1 mm², not counted;
- a vertebra of 700 HU below row 50 on every slice: outside the heart region, not counted;

a total of 122, category 101-400.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

SOFT_TISSUE_HU = 40
CALCIUM_EXPECTED = {"total": 122.0, "category": "101-400", "lesions": 4}


def blank(rows: int = 64, columns: int = 64, hu: float = SOFT_TISSUE_HU) -> np.ndarray:
    return np.full((rows, columns), hu, np.float32)


def ct_series(folder: Path, slices: list[np.ndarray], pixel_spacing=(0.5, 0.5), thickness: float = 3.0,
              spacing: float | None = None, positions: list[float] | None = None, patient: str = "PHANTOM-1",
              series_uid: str | None = None, **per_slice) -> Path:
    """One series of ``slices`` (HU arrays) at ``spacing`` mm apart (the thickness by default),
    written as ``<folder>/s<index>.dcm``; ``per_slice`` sets a header keyword slice by slice."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or pydicom.uid.generate_uid()
    step = spacing if spacing is not None else thickness
    for index, hu in enumerate(slices):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.InstanceNumber = patient, "PHANTOM^CALCIUM", index + 1
        ds.Rows, ds.Columns = hu.shape
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = thickness
        z = positions[index] if positions is not None else index * step
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        del ds.PixelPaddingValue
        ds.PixelData = (np.round(hu) + 1024).astype(np.int16).tobytes()
        for keyword, values in per_slice.items():
            setattr(ds, keyword, values[index])
        ds.save_as(folder / f"s{index}.dcm")
    return folder


def calcium(out: str | Path) -> Path:
    """The phantom of the module docstring under ``out``."""
    out = Path(out)
    slices = [blank() for _ in range(8)]
    for hu in slices:
        hu[50:60, 26:38] = 700  # a vertebra
    slices[2][10:14, 10:14] = 180
    for index in (4, 5):
        slices[index][20:26, 30:36] = 250
        slices[index][22, 32] = 350
    slices[6][30:38, 8:16] = 450
    slices[3][5, 40:43] = 500
    ct_series(out / "series", slices)
    heart = np.zeros((64, 64), bool)
    heart[:44] = True
    np.save(out / "heart.npy", heart)
    (out / "expected.json").write_text(json.dumps({"agatston": CALCIUM_EXPECTED}, indent=2))
    return out


PHANTOMS = {"calcium": calcium}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PHANTOMS))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    print(PHANTOMS[args.name](args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
