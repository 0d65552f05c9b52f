"""benchmarks/learning.py's selection of a recipe by the sets it was not chosen on: its arithmetic,
on kept results (no training)."""
import json

import pytest
import torch

from benchmarks.learning import READOUTS, Selection, target
from dinomx.model import build_models
from tests.conftest import tiny_config


def _row(trained: float, random_init: float = 0.4, pixels: float = 0.5) -> dict:
    # every readout alike, but the patch mean 0.1 lower: the CLS token is chosen unless said
    return {"trained": {r: trained - (0.1 if r == "mean" else 0.0) for r in READOUTS},
            "random_init": {r: random_init for r in READOUTS}, "pixels": pixels, "minutes": 1.0, "steps": 10,
            "collapsed": None}


def test_the_target_is_raw_pixels_or_random_init_plus_what_it_leaves_room_for():
    assert target(0.978, 0.39) == 0.978  # digits: raw pixels are the harder target
    assert target(0.24, 0.62) == pytest.approx(0.82)  # textures: random init + 0.20
    assert target(0.86, 0.88) == pytest.approx(0.96)  # faces: two thirds of the 0.12 random init leaves


def test_a_candidate_is_judged_on_the_set_left_out_by_its_worst_seed(tmp_path):
    # "sharp" wins on x and y and fails z with one seed; "steady" clears every set by a little.
    results = {}
    for seed in (0, 1):
        results[f"sharp|x|{seed}"] = _row(0.90)
        results[f"sharp|y|{seed}"] = _row(0.90)
        results[f"sharp|z|{seed}"] = _row(0.45 if seed else 0.90)
        for name in ("x", "y", "z"):
            results[f"steady|{name}|{seed}"] = _row(0.65)
    (tmp_path / "select.json").write_text(json.dumps(results))
    report = Selection(tmp_path, config=tmp_path / "unused.yaml").report(
        {"sharp": [], "steady": []}, ["x", "y", "z"], [0, 1])
    rows = {line.split(" | ")[0]: line.split(" | ") for line in report.splitlines() if line[:2] in ("x ", "y ", "z ")}
    # Left out z: chosen on x and y, where sharp clears by 0.30; on z its seed 1 falls 0.15 short.
    assert rows["z"][1:] == ["sharp, cls", "+0.300", "-0.150"]
    # Left out x (or y): sharp's z seed fails on the others, so steady is chosen, and clears x.
    assert rows["x"][1:] == ["steady, cls", "+0.050", "+0.050"]
    assert report.rstrip().endswith("worst held-out margin: -0.150")
    # the mean over seeds would have hidden it: sharp's two z seeds average +0.075
    assert "sharp | cls | " in report and report.count("-0.150") >= 2


def test_a_kept_run_is_read_out_again_from_its_exports_when_a_readout_is_added(tmp_path, tiles):
    cfg = tiny_config()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").symlink_to(tiles)
    torch.manual_seed(0)
    _, teacher = build_models(cfg)
    for export in ("backbone", "random-init"):  # one network twice: both read out alike
        teacher.backbone.save_pretrained(tmp_path / "runs" / "kept-x-0" / export, cfg.dataset, cfg.crops.global_crops_size)
    kept = _row(2.0)  # no kNN scores that: what is read again replaces it
    for readouts in (kept["trained"], kept["random_init"]):
        for name in set(readouts) - {"cls", "mean", "both"}:
            del readouts[name]
    (tmp_path / "select.json").write_text(json.dumps({"kept|x|0": kept}))
    # No config to train with: the row can only come from the exports.
    row = Selection(tmp_path, config=tmp_path / "unused.yaml").run("kept", [], "x", 0)
    assert set(row["trained"]) == set(READOUTS) and row["trained"] == row["random_init"]
    assert all(0 <= v <= 1 for v in row["trained"].values())
    assert (row["minutes"], row["steps"]) == (1.0, 10)  # the training it had is kept
    assert json.loads((tmp_path / "select.json").read_text())["kept|x|0"] == row
