"""Datasets on S3: a real S3 server on loopback (SeaweedFS, which checks signatures), reached by
boto3 and DVC through an endpoint URL, as MinIO or PowerScale would be."""
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data.dataset import DatasetError, IngestParams, add_dataset, pipeline
from data.validate import ValidationReport
from data.versioning import dataset_version
from dinomx.shards import read_index
from projects.tracking import DataNotValidatedError, log_training_data, training_data
from scripts.demo import free_port
from tests.conftest import BUCKET, pseudonym

pytestmark = pytest.mark.slow


@pytest.fixture()
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    return root


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)


def test_an_s3_ct_dataset_is_imported_built_validated_versioned_and_pushed(s3, s3_endpoint, repo, tmp_path):
    prefix = "datasets/chest-ct/raw"
    s3.upload_file(get_testdata_file("CT_small.dcm"), BUCKET, f"{prefix}/chest/ct_small.dcm")
    s3.upload_file(get_testdata_file("eCT_Supplemental.dcm"), BUCKET, f"{prefix}/chest/enhanced.dcm")

    folder = add_dataset(repo, "chest-ct", f"s3://{BUCKET}/{prefix}", IngestParams("ct", val_fraction=0.0),
                         endpoint_url=s3_endpoint)
    raw_dvc = yaml.safe_load((folder / "raw.dvc").read_text())
    assert raw_dvc["deps"][0]["path"] == f"s3://{BUCKET}/{prefix}" and raw_dvc["deps"][0]["fs_config"] == {
        "endpointurl": s3_endpoint}
    assert sorted(p.name for p in (folder / "raw/chest").iterdir()) == ["ct_small.dcm", "enhanced.dcm"]

    run = _dvc(repo, "repro", "data/chest-ct/dvc.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    train = folder / "tiles/shards/train"
    # One shard per series: the single slice, and the two frames of the enhanced CT.
    assert sorted(s.samples for s in read_index(train).shards) == [1, 2]
    report = ValidationReport.read(folder / "validation/report.json")
    assert report.success and report.suite == "ct_slices" and report.rows == 3
    assert report.shards == {"shards": 2, "checked": 2, "cached": 0, "hashed": 2}

    # The exact version a run names: the md5 of the ingest stage's output in dvc.lock.
    version = dataset_version(train)
    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    assert version.md5 == lock["stages"]["ingest"]["outs"][0]["md5"]
    assert version.source == "data/chest-ct/dvc.lock:ingest"

    # A data remote on the same S3 service: `dvc push` stores the dataset there by content hash.
    for args in (["remote", "add", "-d", "store", f"s3://{BUCKET}/dvc-store"],
                 ["remote", "modify", "store", "endpointurl", s3_endpoint]):
        assert _dvc(repo, *args).returncode == 0
    pushed = _dvc(repo, "push")
    assert pushed.returncode == 0, pushed.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc-store/")["Contents"]}
    assert f"dvc-store/files/md5/{version.digest[:2]}/{version.digest[2:]}.dir" in keys
    shutil.rmtree(folder / "tiles")
    assert _dvc(repo, "pull", "data/chest-ct/dvc.yaml").returncode == 0
    assert read_index(train).samples == 3 and len(list(train.glob("*.tar"))) == 2

    # Training refers to that version and its validation; the report is logged to MLflow.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = training_data(train, folder / "validation/report.json")
    with mlflow.start_run() as active:
        report_uri = log_training_data(data, context="training")
    logged = mlflow.get_run(active.info.run_id)
    [dataset_input] = logged.inputs.dataset_inputs
    assert dataset_input.dataset.digest == version.digest and "s3://" in dataset_input.dataset.source
    assert report_uri.endswith("data_validation/report.json")
    assert logged.data.tags["data.validation.suite"] == "ct_slices"
    # What the data was built from reaches the run, and so the lineage a reviewer reads.
    assert logged.data.tags["data.inputs"] == "2 inputs: 2 used, 0 skipped, 0 quarantined"
    assert logged.data.tags["data.shards"] == "2 shards, 3 tiles"
    assert {t.key: t.value for t in dataset_input.tags}["data.shards"] == "2 shards, 3 tiles"

    # A new series under the prefix: `dvc update` moves the pinned version, and the pipeline
    # tiles and checks that series alone (the others keep their shard files and checks).
    before = {p.name: p.stat().st_ino for p in train.glob("*.tar")}
    another = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    another.SOPInstanceUID, another.SeriesInstanceUID = generate_uid(), generate_uid()
    another.save_as(tmp_path / "another.dcm")
    s3.upload_file(str(tmp_path / "another.dcm"), BUCKET, f"{prefix}/chest/another.dcm")
    assert _dvc(repo, "update", "data/chest-ct/raw.dvc").returncode == 0
    rebuilt = _dvc(repo, "repro", "data/chest-ct/dvc.yaml")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    after = {p.name: p.stat().st_ino for p in train.glob("*.tar")}
    assert {name: after[name] for name in before} == before and len(after) == 3
    assert "/.tiles.inputs-md5.json" in (folder / ".gitignore").read_text().splitlines()
    shards = ValidationReport.read(folder / "validation/report.json").shards
    assert {k: shards[k] for k in ("shards", "checked", "cached")} == {"shards": 3, "checked": 1, "cached": 2}
    assert dataset_version(train).md5 != version.md5


def test_an_mr_series_in_a_ct_export_is_skipped_with_its_reason(s3, s3_endpoint, repo):
    prefix = "datasets/study/raw"
    s3.upload_file(get_testdata_file("CT_small.dcm"), BUCKET, f"{prefix}/ct.dcm")
    s3.upload_file(get_testdata_file("MR_small.dcm"), BUCKET, f"{prefix}/mr.dcm")
    folder = add_dataset(repo, "study", f"s3://{BUCKET}/{prefix}", IngestParams("ct"), endpoint_url=s3_endpoint)
    run = _dvc(repo, "repro", "data/study/dvc.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    report = ValidationReport.read(folder / "validation/report.json")
    assert report.success and report.rows == 1
    assert [(s["source"], s["reason"]) for s in report.skipped] == [(pseudonym("mr.dcm"),
                                                                     "modality MR, not CT (this dataset ingests CT)")]


def test_dataset_names_and_pipelines_are_checked(repo):
    with pytest.raises(ValueError, match="name: expected lowercase letters"):
        add_dataset(repo, "../escape", "s3://b/p", IngestParams("ct"))
    with pytest.raises(ValueError, match="modality: expected one of 'he', 'ct', 'rgb', 'gray', got 'xr'"):
        IngestParams("xr")
    stages = pipeline(IngestParams("he", magnifications=(20.0, 5.0), tile_size=112))["stages"]
    assert stages["ingest"]["cmd"].startswith("python -m data.ingest he --raw raw --out tiles --magnifications 20 5 ")
    assert "--suite he_tiles --tile-size 112 --magnifications 20 5 --min-tissue 0.5" in stages["validate"]["cmd"]
    # Slides and series are sharded unless told otherwise; their shards stay when an unchanged
    # slide is ingested again, so DVC must not delete the output before the stage runs.
    assert IngestParams("he").images == "tiles/shards" and stages["ingest"]["outs"] == [{"tiles": {"persist": True}}]
    assert IngestParams("he", magnifications=(20.0, 5.0), layout="folder").images == "tiles/20x"
    assert pipeline(IngestParams("rgb"))["stages"]["ingest"]["outs"] == ["tiles"]
    with pytest.raises(ValueError, match="layout: shards are written for slides and CT series"):
        IngestParams("rgb", layout="shards")


def test_a_missing_prefix_is_one_clear_error_and_leaves_nothing_behind(s3, s3_endpoint, repo):
    with pytest.raises(DatasetError, match=rf"source: s3://{BUCKET}/no/such/prefix at {s3_endpoint} could not be imported"):
        add_dataset(repo, "ghost", f"s3://{BUCKET}/no/such/prefix", IngestParams("ct"), endpoint_url=s3_endpoint)
    assert not (repo / "data" / "ghost").exists()
    with pytest.raises(FileNotFoundError, match="source: .* is not a folder"):
        add_dataset(repo, "ghost", str(repo.parent / "nowhere"), IngestParams("rgb"))


def test_a_local_image_folder_is_imported_built_validated_and_trainable(repo, tmp_path):
    photos = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for label in ("cats", "dogs"):
        (photos / label).mkdir(parents=True)
        for index in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(photos / label / f"{index}.png")
    folder = add_dataset(repo, "photos", str(photos), IngestParams("gray", val_fraction=0.3))
    assert yaml.safe_load((folder / "raw.dvc").read_text())["deps"][0]["path"] == str(photos)
    built = _dvc(repo, "repro", "data/photos/dvc.yaml")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "--suite images_gray" in (folder / "dvc.yaml").read_text()
    data = training_data(folder / "tiles/train", folder / "validation/report.json")  # what pretrain checks
    assert data.report.success and data.version.source == "data/photos/dvc.lock:ingest"
    assert data.report.inputs_line() == "12 inputs: 12 used, 0 skipped, 0 quarantined"

    # A failed report stops training, unless told to skip the gate, which the run then records.
    failed = json.loads((folder / "validation/report.json").read_text()) | {"success": False}
    (folder / "validation/failed.json").write_text(json.dumps(failed))
    with pytest.raises(DataNotValidatedError, match="failed validation; nothing trains on it"):
        training_data(folder / "tiles/train", folder / "validation/failed.json")
    skipped = training_data(folder / "tiles/train", folder / "validation/failed.json", skip_gate=True)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as active:
        log_training_data(skipped, context="training")
    tags = mlflow.get_run(active.info.run_id).data.tags
    assert tags["data.validation.gate"] == "skipped" and tags["data.validation.success"] == "false"
    assert sum(1 for _ in (folder / "tiles").rglob("*.png")) == 12


def test_an_unreachable_endpoint_is_one_line_and_leaves_nothing_behind(repo, capsys, monkeypatch):
    from data.dataset import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "hospital")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-checked-here")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["add", "far", "--modality", "ct", "--source", "s3://exports/ct", "--endpoint-url", endpoint,
                 "--repo", str(repo)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"source: s3://exports/ct at {endpoint} could not be imported" in line
    assert not (repo / "data" / "far").exists()


def test_every_ingestion_option_reaches_the_dataset_pipeline(repo, tmp_path):
    from data.dataset import main

    slides = tmp_path / "slides"
    (slides / "case1").mkdir(parents=True)
    (slides / "case1" / "a.svs").write_bytes(b"not opened here")
    (tmp_path / "cases.csv").write_text("slide,case\ncase1/a.svs,patient-7\n")
    assert main(["add", "slides", "--modality", "he", "--source", str(slides), "--repo", str(repo),
                 "--cases", str(tmp_path / "cases.csv"), "--lenient-annotations", "--on-error", "quarantine",
                 "--magnifications", "20", "5"]) == 0
    stage = yaml.safe_load((repo / "data" / "slides" / "dvc.yaml").read_text())["stages"]["ingest"]
    assert "--cases cases.csv --lenient-annotations" in stage["cmd"] and "--on-error quarantine" in stage["cmd"]
    assert stage["deps"] == ["raw", "cases.csv"] and (repo / "data" / "slides" / "cases.csv").is_file()
    # The export and its cases (MRNs, often) are pinned imports that git ignores and `dvc push` leaves alone.
    for imported in ("raw.dvc", "cases.csv.dvc"):
        assert yaml.safe_load((repo / "data" / "slides" / imported).read_text())["outs"][0]["push"] is False
    assert {"/raw", "/cases.csv", "/.tiles.pseudonymous/"} <= set((repo / "data/slides/.gitignore").read_text().splitlines())
    assert main(["add", "ct", "--modality", "ct", "--source", str(slides), "--repo", str(repo),
                 "--channels", "windows", "--windows=40:400,-600:1500,400:1800"]) == 0
    cmd = yaml.safe_load((repo / "data" / "ct" / "dvc.yaml").read_text())["stages"]["ingest"]["cmd"]
    assert "--channels windows --windows=40:400,-600:1500,400:1800" in cmd


def test_predict_reads_a_cohort_of_slides_and_a_ct_series_from_a_prefix(s3, s3_endpoint, tmp_path, monkeypatch):
    """A prefix of slides is a cohort, one input per slide object; a prefix of DICOM files is one
    series, fetched and scored (threshold-only, the calcium phantom: 122, as its docstring works out)."""
    from clinical.series import predict_series
    from data.phantoms import calcium
    from data.sources import cohort, fetch

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name in ("b.svs", "a.ndpi", "notes.txt"):
        s3.put_object(Bucket=BUCKET, Key=f"study/slides/{name}", Body=b"x")
    assert cohort(f"s3://{BUCKET}/study/slides/") == [f"s3://{BUCKET}/study/slides/a.ndpi",
                                                      f"s3://{BUCKET}/study/slides/b.svs"]
    phantom = calcium(tmp_path / "phantom")
    for path in (phantom / "series").iterdir():
        s3.upload_file(str(path), BUCKET, f"study/patient7/{path.name}")
    assert cohort(f"s3://{BUCKET}/study/patient7") == [f"s3://{BUCKET}/study/patient7"]
    series = fetch(f"s3://{BUCKET}/study/patient7", tmp_path / "fetched")
    scored = predict_series(series, tmp_path / "out", score="agatston", region=np.load(phantom / "heart.npy"))
    assert (scored["score"]["total"], scored["series"]["slices"]) == (122.0, 8)


def test_only_the_s3_port_answers_without_seaweedfs_jwts_and_it_checks_signatures(s3, s3_stack):
    """What the stack's filer, volume and master ports answer to anyone on the machine who skips
    S3: refusals (SeaweedFS's JWT security), while S3 with a signature works."""
    import httpx

    s3.put_object(Bucket=BUCKET, Key="slides/a.txt", Body=b"patient data")
    p = s3_stack.ports
    filer = f"http://127.0.0.1:{p.filer}/buckets/{BUCKET}/slides"
    for answer in (httpx.get(f"{filer}/", timeout=10), httpx.get(f"{filer}/a.txt", timeout=10),
                   httpx.post(f"{filer}/b.txt", files={"file": ("b.txt", b"written around S3")}, timeout=10)):
        assert answer.status_code == 401 and "jwt" in answer.text, (answer.request.url, answer.status_code, answer.text)
    assigned = httpx.get(f"http://127.0.0.1:{p.master}/dir/assign", timeout=10).json()
    assert "auth" not in assigned  # the master hands write tokens to the S3 gateway, not to callers
    written = httpx.post(f"http://{assigned['url']}/{assigned['fid']}", files={"file": ("c", b"x")}, timeout=10)
    assert written.status_code == 401
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="slides/")["Contents"]]
    assert listed == ["slides/a.txt"] and s3.get_object(Bucket=BUCKET, Key="slides/a.txt")["Body"].read() == b"patient data"
    unsigned = httpx.get(f"{s3_stack.s3_endpoint}/{BUCKET}/slides/a.txt", timeout=10)
    assert unsigned.status_code == 403
    security = s3_stack.root / "security.toml"
    assert oct(security.stat().st_mode & 0o777) == "0o600" and "[jwt.filer_signing]" in security.read_text()
