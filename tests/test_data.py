import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data.synthetic import CLASSES, generate
from data.validate import ValidationReport, validate_dataset
from data.validate import main as validate_main
from data.versioning import UntrackedDataError, dataset_version
from tests.conftest import REPO


def test_generation_is_deterministic_and_laid_out_by_split_and_class(tmp_path, tiles):
    again = generate(tmp_path / "images", seed=0, image_size=32, train_per_class=24, val_per_class=8)
    for split in ("train", "val"):
        assert sorted(p.name for p in (again / split).iterdir()) == sorted(CLASSES)
    first = sorted(tiles.rglob("*.png"))
    second = sorted(again.rglob("*.png"))
    assert len(first) == len(second) == 4 * 32
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    assert not (tmp_path / "images.partial").exists()


def test_clean_tiles_pass_the_suite(tiles, tmp_path):
    report, frame = validate_dataset(tiles, "image_tiles_rgb", {"tile_size": 32}, context_dir=tmp_path)
    assert report.success, report.summary()
    assert report.rows == len(frame) == 128 and report.evaluated_expectations >= 10
    assert set(frame["channels"]) == {3}


def test_bad_files_fail_the_suite_and_are_named(tiles, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiles, bad)
    (bad / "train/glands/truncated.png").write_bytes((bad / "train/glands/glands_0000.png").read_bytes()[:60])
    Image.new("L", (32, 32), 128).save(bad / "val/stroma/gray.png")
    Image.fromarray(np.zeros((48, 32, 3), np.uint8) + 90).save(bad / "val/nuclei/big.png")
    (bad / "train/stroma/notes.txt").write_text("not an image")

    code = validate_main(["--dataset", str(bad), "--report-dir", str(tmp_path / "report"),
                          "--suite", "image_tiles_rgb", "--tile-size", "32", "--context-root", str(tmp_path)])
    assert code == 1
    report = ValidationReport.read(tmp_path / "report/report.json")
    assert not report.success
    failing = {(f.column, tuple(f.files)) for f in report.failures}
    assert ("readable", ("train/glands/truncated.png", "train/stroma/notes.txt")) in failing
    assert ("channels", ("val/stroma/gray.png",)) in failing
    assert ("height", ("val/nuclei/big.png",)) in failing
    assert ("is_image_file", ("train/stroma/notes.txt",)) in failing
    assert ("pixel_std", ("val/nuclei/big.png", "val/stroma/gray.png")) in failing
    assert (tmp_path / "report/metadata.csv").is_file()
    assert "FAILED" in capsys.readouterr().out
    # The GX file context keeps the run and its Data Docs page, which names the failing file.
    site = Path(report.data_docs)
    assert site == tmp_path / "gx/uncommitted/data_docs/local_site/index.html" and site.is_file()
    [page] = site.parent.glob("validations/image_tiles_rgb/*/*/*.html")
    assert "val/stroma/gray.png" in page.read_text()
    assert (tmp_path / "gx/expectations/image_tiles_rgb.json").is_file()


def test_a_suite_parameter_left_out_is_named(tiles, tmp_path):
    with pytest.raises(ValueError, match=r"needs parameter\(s\) \['tile_size'\] \(--tile-size\)"):
        validate_dataset(tiles, "image_tiles_rgb", {}, context_dir=tmp_path)


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture()
def dvc_repo(tmp_path) -> Path:
    """A real git + DVC repository with the project's pipeline, small parameters."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "data", root / "data", ignore=shutil.ignore_patterns("__pycache__", "demo", "gx"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(train_per_class=4, val_per_class=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def test_dvc_pipeline_versions_validates_and_pushes(dvc_repo):
    run = subprocess.run(["dvc", "repro"], cwd=dvc_repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (dvc_repo / "data/demo/validation/report.json").is_file()

    version = dataset_version(dvc_repo / "data/demo/images/train")
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["generate"]["outs"] if o["path"] == "data/demo/images")
    assert version.md5 == md5 and md5.endswith(".dir")
    assert version.tracked_path == "data/demo/images" and version.source == "dvc.lock:generate"
    assert version.remote_url == str(dvc_repo / ".dvc-storage")

    subprocess.run(["dvc", "push"], cwd=dvc_repo, check=True, capture_output=True)
    # The remote now holds the directory manifest under its md5: a fresh checkout can `dvc pull` it.
    digest = version.digest
    assert (dvc_repo / ".dvc-storage/files/md5" / digest[:2] / (digest[2:] + ".dir")).is_file()
    shutil.rmtree(dvc_repo / "data/demo/images")
    subprocess.run(["dvc", "pull"], cwd=dvc_repo, check=True, capture_output=True)
    assert len(list((dvc_repo / "data/demo/images").rglob("*.png"))) == 4 * 6


def test_failing_validation_stops_dvc_repro_and_keeps_the_report(dvc_repo):
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    # Tiles of 24 px against a suite expecting 32 px: the validate stage must fail.
    (dvc_repo / "dvc.yaml").write_text((dvc_repo / "dvc.yaml").read_text().replace(
        "--tile-size ${generate.image_size}\n", "--tile-size 24\n"))
    run = subprocess.run(["dvc", "repro"], cwd=dvc_repo, capture_output=True, text=True)
    assert run.returncode != 0
    assert params["generate"]["image_size"] == 32
    report = ValidationReport.read(dvc_repo / "data/demo/validation/report.json")
    assert not report.success and {f.column for f in report.failures} >= {"width", "height"}
    assert report.data_docs == "data/gx/uncommitted/data_docs/local_site/index.html"
    assert (dvc_repo / report.data_docs).is_file()


def test_untracked_data_is_refused(tmp_path, dvc_repo):
    (dvc_repo / "elsewhere").mkdir()
    with pytest.raises(UntrackedDataError, match="not tracked by DVC"):
        dataset_version(dvc_repo / "elsewhere")
    with pytest.raises(UntrackedDataError, match="not inside a DVC repository"):
        dataset_version(tmp_path)


def test_the_engine_cli_refuses_data_whose_report_beside_it_failed(tmp_path, capsys):
    from dinomx.cli import main

    train = tmp_path / "data" / "ct" / "tiles" / "slices" / "train"
    train.mkdir(parents=True)
    (tmp_path / "data" / "ct" / "validation").mkdir()
    (tmp_path / "data" / "ct" / "validation" / "report.json").write_text(json.dumps(
        {"success": False, "failures": [{"expectation": "expect_column_values_to_be_between", "column": "hu_min"}]}))
    assert main(["--config", str(tmp_path / "missing.yaml"), "--data", str(train)]) == 2
    err = capsys.readouterr().err
    assert "failed (1 expectation(s): expect_column_values_to_be_between(hu_min)); nothing trains on it" in err
    assert "--skip-validation-gate" in err
    # Told to, it goes on (to the next problem: here, the config).
    assert main(["--config", str(tmp_path / "missing.yaml"), "--data", str(train), "--skip-validation-gate"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("params", [
    dict(modality="he", magnifications=(20.0, 5.0), tile_size=112, cases="cases.csv", lenient_annotations=True, workers=3),
    dict(modality="ct", channels="windows", windows=((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0)),
         thickness=(0.5, 1.5), kernels=("B30f", "FC07"), on_error="quarantine"),
    dict(modality="gray", value_range=(-100.0, 4000.0), val_fraction=0.3, seed=7),
])
def test_ingestion_options_round_trip_through_the_command_line_they_write(params):
    import argparse

    from data.params import IngestParams

    parser = argparse.ArgumentParser()
    IngestParams.add_arguments(parser)
    declared = IngestParams(**params)
    assert IngestParams.from_args(declared.modality, parser.parse_args(declared.argv())) == declared


def test_dvc_lock_records_the_code_its_stages_run():
    """A stage's code changed without `dvc repro`: every checkout would re-run it and leave dvc.lock
    modified, so every model trained there would say "uncommitted changes"."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if path.suffix == ".py":
                assert hashlib.md5(path.read_bytes()).hexdigest() == dep["md5"], (
                    f"dvc.lock: stage {name} ran another {dep['path']}; run `dvc repro` and commit dvc.lock")
