"""The Agatston score on DICOM phantoms whose lesions have a known area and HU, each expected score
worked out by hand in the comment beside it: 129/130/199/200/399/400 HU, under and at 1 mm²,
lesions over two slices, 1.5 against 3 mm slices, anisotropic pixels, corner-touching pixels."""
import csv
import json

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from clinical import scores
from clinical.scores import ScoredSlice, ScoreError, agatston
from clinical.series import predict_series
from data.inputs import IngestError
from data.phantoms import blank, calcium, ct_series
from data.volume import read_series


def lesion(hu: np.ndarray, top: int, left: int, rows: int, cols: int, value: float) -> np.ndarray:
    hu[top:top + rows, left:left + cols] = value
    return hu


def _lesions(folder):
    with open(folder / "lesions.csv") as f:
        return list(csv.DictReader(f))


def test_peak_bands_minimum_area_and_a_lesion_over_two_slices_score_as_worked_out_by_hand(tmp_path):
    # 0.5 x 0.5 mm pixels (0.25 mm² each), 3 mm slices (factor 1): a 4x4 lesion is 4 mm².
    s0 = blank()
    lesion(s0, 2, 2, 4, 4, 130)     # 4 mm² x weight 1 = 4
    lesion(s0, 2, 20, 4, 4, 129)    # under 130 HU: no candidate, 0
    s1 = blank()
    lesion(s1, 2, 2, 4, 4, 199)     # 4 x 1 = 4
    lesion(s1, 2, 20, 4, 4, 150)
    s1[3, 21] = 200                 # the peak decides: 4 x 2 = 8
    lesion(s1, 20, 2, 1, 3, 500)    # 3 px = 0.75 mm² < 1 mm²: not counted
    lesion(s1, 20, 20, 2, 2, 399)   # 4 px = 1 mm² exactly, counted: 1 x 3 = 3
    s2, s3 = lesion(blank(), 40, 40, 4, 4, 400), lesion(blank(), 40, 40, 4, 4, 400)  # 4 x 4 = 16 on each: 32
    folder = ct_series(tmp_path / "series", [s0, s1, s2, s3])
    summary = predict_series(folder, tmp_path / "out", score="agatston")
    assert summary["score"]["total"] == pytest.approx(4 + 4 + 8 + 3 + 16 + 16)  # 51
    assert summary["score"]["category"] == "11-100" and summary["score"]["lesions"] == 6
    rows = _lesions(tmp_path / "out")
    assert sorted((int(r["slice"]), float(r["area_mm2"]), float(r["peak_hu"]), int(r["weight"]), float(r["score"]))
                  for r in rows) == [(0, 4.0, 130.0, 1, 4.0), (1, 1.0, 399.0, 3, 3.0), (1, 4.0, 199.0, 1, 4.0),
                                     (1, 4.0, 200.0, 2, 8.0), (2, 4.0, 400.0, 4, 16.0), (3, 4.0, 400.0, 4, 16.0)]
    # Each slice with a counted lesion has a review image: the window, candidates, numbered boxes.
    assert sorted(p.name for p in (tmp_path / "out" / "lesions").iterdir()) == [
        "slice_0000.png", "slice_0001.png", "slice_0002.png", "slice_0003.png"]
    geometry = summary["series"]
    assert geometry["slices"] == 4 and geometry["pixel_spacing_mm"] == [0.5, 0.5] and geometry["slice_spacing_mm"] == 3.0


def test_thin_slices_count_their_share_of_a_3_mm_slice(tmp_path):
    # The same 4 mm², 400 HU lesion seen on two 1.5 mm slices: 2 x (4 x 4 x 1.5/3) = 16, as on one 3 mm slice.
    thin = ct_series(tmp_path / "thin", [lesion(blank(), 8, 8, 4, 4, 400) for _ in range(2)], thickness=1.5)
    thick = ct_series(tmp_path / "thick", [lesion(blank(), 8, 8, 4, 4, 400)], thickness=3.0)
    assert predict_series(thin, tmp_path / "a", score="agatston")["score"]["total"] == pytest.approx(16)
    assert predict_series(thick, tmp_path / "b", score="agatston")["score"]["total"] == pytest.approx(16)


def test_anisotropic_pixels_and_corner_touching_pixels(tmp_path):
    # 0.4 x 0.8 mm pixels: 0.32 mm² each. A 5x5 lesion at 300 HU: 25 x 0.32 = 8 mm² x 3 = 24.
    s = lesion(blank(), 2, 2, 5, 5, 300)
    lesion(s, 20, 2, 1, 3, 250)          # 3 px = 0.96 mm² < 1: not counted
    lesion(s, 30, 2, 1, 4, 250)          # 4 px = 1.28 mm² x 2 = 2.56
    # Two 3-pixel runs touching only at a corner: one lesion (8-connectivity) of 6 px = 1.92 mm² x 1 = 1.92;
    # as two lesions each would be under 1 mm² and not counted.
    lesion(s, 40, 2, 1, 3, 140)
    lesion(s, 41, 5, 1, 3, 140)
    folder = ct_series(tmp_path / "series", [s], pixel_spacing=(0.4, 0.8))
    summary = predict_series(folder, tmp_path / "out", score="agatston")
    assert summary["score"]["total"] == pytest.approx(24 + 2.56 + 1.92)
    assert sorted(int(r["pixels"]) for r in _lesions(tmp_path / "out")) == [4, 6, 25]


def test_only_the_given_region_counts_in_threshold_only_mode(tmp_path):
    s = lesion(lesion(blank(), 2, 2, 4, 4, 400), 40, 40, 4, 4, 400)  # two lesions of 16
    folder = ct_series(tmp_path / "series", [s])
    region = np.zeros((64, 64), bool)
    region[:32, :32] = True
    assert predict_series(folder, tmp_path / "a", score="agatston", region=region)["score"]["total"] == pytest.approx(16)
    with pytest.raises(IngestError, match=r"region: shape \(3, 3\); expected \(64, 64\) or \(1, 64, 64\)"):
        predict_series(folder, tmp_path / "b", score="agatston", region=np.zeros((3, 3), bool))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("total, expected", [(0, "0-10"), (10, "0-10"), (10.5, "11-100"), (100, "11-100"),
                                             (100.01, "101-400"), (400, "101-400"), (400.01, ">400")])
def test_risk_categories_are_the_papers_table_3(total, expected):
    assert agatston.category(total) == expected


def test_score_modules_are_plug_ins_named_by_their_file(tmp_path):
    assert scores.get("agatston") is agatston and agatston.CATEGORIES == ("0-10", "11-100", "101-400", ">400")
    with pytest.raises(ScoreError, match=r"score: unknown 'calcium'; installed: \['agatston'\]"):
        scores.get("calcium")
    result = agatston.score([ScoredSlice(0, 0.0, lesion(blank(), 0, 0, 2, 2, 400), np.ones((64, 64), bool), (1.0, 1.0), 3.0)])
    assert (result.total, result.category) == (16.0, "11-100")  # 4 mm² x 4


def test_series_that_are_not_one_volume_are_refused_naming_the_file(tmp_path):
    gap = ct_series(tmp_path / "gap", [blank()] * 4, positions=[0.0, 3.0, 6.0, 12.0])
    with pytest.raises(IngestError, match=r"s3.dcm: series .*: a gap of 6 mm before s3.dcm \(median spacing 3 mm\); a slice "
                                          "is missing"):
        read_series(gap)
    mixed = ct_series(tmp_path / "mixed", [blank()] * 3, PixelSpacing=[[0.5, 0.5], [0.5, 0.5], [0.7, 0.7]])
    with pytest.raises(IngestError, match=r"s2.dcm: series .*: pixel spacing \(0.7, 0.7\) differs from \(0.5, 0.5\)"):
        predict_series(mixed, tmp_path / "out", score="agatston")
    assert not (tmp_path / "out").exists()
    two = ct_series(tmp_path / "two", [blank()])
    ct_series(two / "other", [blank()], series_uid="1.2.3.4")
    with pytest.raises(IngestError, match=r"holds 2 CT series .*; name one \(--series <uid>\)"):
        read_series(two)
    assert read_series(two, "1.2.3.4").series_uid == "1.2.3.4"
    cut = ct_series(tmp_path / "cut", [blank()] * 3)
    (cut / "s1.dcm").write_bytes((cut / "s1.dcm").read_bytes()[:3000])  # a copy that stopped
    (cut / "report.pdf").write_text("not an image")
    with pytest.raises(IngestError, match=r"s1.dcm: DICOM file truncated or corrupt: a CT image .* ends before its pixel data"):
        predict_series(cut, tmp_path / "cut-out", score="agatston")
    assert not (tmp_path / "cut-out").exists()


def test_a_real_ct_slice_is_read_in_patient_geometry_and_scored(tmp_path):
    """pydicom's CT_small (a real scan, 0.66 mm pixels, 5 mm thick): bone counts above 130 HU in
    threshold-only mode, each lesion scaled by 5/3; one lesion checked against the HU read by hand."""
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    summary = predict_series(folder, tmp_path / "out", score="agatston")
    assert summary["series"]["pixel_spacing_mm"] == [0.661468, 0.661468] and summary["series"]["slice_thickness_mm"] == 5.0
    rows = _lesions(tmp_path / "out")
    assert rows and summary["score"]["total"] == pytest.approx(sum(float(r["score"]) for r in rows))
    biggest = max(rows, key=lambda r: int(r["pixels"]))
    area = int(biggest["pixels"]) * 0.661468 ** 2
    assert float(biggest["area_mm2"]) == pytest.approx(area, abs=1e-3)
    assert float(biggest["score"]) == pytest.approx(area * agatston.weight(float(biggest["peak_hu"])) * 5 / 3, rel=1e-4)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mode"] == "threshold only"


def test_the_calcium_phantom_scores_what_its_docstring_works_out(tmp_path):
    out = calcium(tmp_path / "phantom")
    summary = predict_series(out / "series", tmp_path / "scored", score="agatston", region=np.load(out / "heart.npy"))
    expected = json.loads((out / "expected.json").read_text())["agatston"]
    assert (summary["score"]["total"], summary["score"]["category"], summary["score"]["lesions"]) == (
        expected["total"], expected["category"], expected["lesions"])
    # Without the region the vertebra counts on every slice: threshold-only needs one.
    assert predict_series(out / "series", tmp_path / "all", score="agatston")["score"]["total"] > 1000
