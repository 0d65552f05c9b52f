"""Nothing derived from an export carries a patient identifier: proved by planting identifiers in
realistic exports and scanning every byte ingestion (and, in the slow test, the whole path) writes."""
import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import openslide
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data.ingest import main as ingest_main
from data.inputs import file_md5
from data.metadata import shard_metadata
from data.privacy import KEY_ENV, MAP_ENV, Pseudonyms, new_key, reveal
from data.validate import main as validate_main
from tests.conftest import tiny_overrides
from tests.test_ingest import slide  # noqa: F401  (the real slide fixture)

PATIENTS = {  # folder, PatientName, PatientID, birth date, accession number
    "calcified": [("Doe_Jane_MRN-00142", "Doe^Jane", "MRN-00142", "19610412", "ACC778899")],
    "normal": [("Roe_Richard_MRN-00977", "Roe^Richard", "MRN-00977", "19550203", "ACC112233")],
}
INSTITUTION, PHYSICIAN = "St Elsewhere General", "House^Gregory"


# Two patients a class, for the whole path: one in each split under WHOLE_PATH_KEY.
WHOLE_PATH = {
    "calcified": [*PATIENTS["calcified"], ("Poe_Edgar_MRN-00321", "Poe^Edgar", "MRN-00321", "19490119", "ACC445566")],
    "normal": [*PATIENTS["normal"], ("Moe_Anna_MRN-00654", "Moe^Anna", "MRN-00654", "19700707", "ACC998877")],
}
WHOLE_PATH_KEY = "0" * 64


def identifiers(patients: dict = PATIENTS) -> set[str]:
    """What must appear nowhere: names (whole and in parts), MRNs (and their digits), birth dates
    (as stored and as folders spell them), accession numbers, the institution, the physician."""
    found = {INSTITUTION, "Elsewhere", "House", "Gregory"}
    for of_label in patients.values():
        for folder, name, mrn, born, accession in of_label:
            family, given = name.split("^")
            found |= {folder, name, family, given, mrn, mrn.split("-")[1], born, f"{born[:4]}-{born[4:6]}-{born[6:]}",
                      accession}
    return found


def _slice(patient: tuple, study_uid: str, series_uid: str, index: int, **header) -> pydicom.Dataset:
    folder, name, mrn, born, accession = patient
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = name, mrn, born, accession
    ds.InstitutionName, ds.ReferringPhysicianName, ds.OtherPatientIDs = INSTITUTION, PHYSICIAN, mrn
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = f"CT HEAD {name}"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]), 5.0 * index]
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    return ds


def hospital_export(root: Path, slices: int = 4, patients: dict = PATIENTS) -> tuple[Path, set[str]]:
    """A PACS export as hospitals write them: ``<class>/<patient name_MRN>/<study date>/IMxxxx``,
    every header full of identifiers, a slice with text burned into its pixels, a secondary
    capture (a dose report screenshot), a slice cut short and a hidden copy. Returns the export
    and every UID in it (also never to be written)."""
    uids = set()
    for label, of_label in patients.items():
        for patient in of_label:
            study, series = generate_uid(), generate_uid()
            folder = root / label / patient[0] / f"CT_{patient[3][:4]}-{patient[3][4:6]}-{patient[3][6:]}"
            folder.mkdir(parents=True)
            for index in range(slices):
                ds = _slice(patient, study, series, index)
                ds.save_as(folder / f"IM{index:04d}")
                uids.add(ds.SOPInstanceUID)
            _slice(patient, study, series, slices, BurnedInAnnotation="YES").save_as(folder / f"IM{slices:04d}")
            capture = _slice(patient, study, generate_uid(), 0, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
            capture.save_as(folder / "dose_report.dcm")
            uids |= {study, series, capture.SeriesInstanceUID, capture.SOPInstanceUID}
    first = root / "calcified" / patients["calcified"][0][0]
    slice_folder = next(first.iterdir())
    cut = slice_folder / f"IM{slices - 1:04d}"
    cut.write_bytes(cut.read_bytes()[:20000])
    shutil.copy(slice_folder / "IM0000", slice_folder / ".IM0000")
    return root, uids


IMAGES = (".png", ".gif", ".jpg", ".jpeg", ".ico", ".webp")


def _readable(name: str, data: bytes) -> bytes:
    """What of a file can carry text: an image's metadata (PNG text chunks, EXIF), not its
    compressed pixels, where three letters turn up by chance; any other file whole."""
    if not name.lower().endswith(IMAGES):
        return data
    with Image.open(io.BytesIO(data)) as image:
        return repr(image.info).encode() + repr(dict(image.getexif())).encode()


def whole_words(needles: set[str]) -> list[tuple[str, re.Pattern]]:
    """Each needle as a lowercase whole word in bytes: "Doe" is an identifier here, "Does" in a
    library's YAML is not."""
    return [(n, re.compile(rb"(?<![a-z0-9])" + re.escape(n.lower().encode()) + rb"(?![a-z0-9])")) for n in needles]


def scan(paths: list[Path], needles: set[str]) -> dict[str, list[str]]:
    """Every needle found in the names or contents of the files under ``paths`` (and of the
    members of every tar among them), case-insensitively: {needle: [where]}."""
    hits: dict[str, list[str]] = {}
    patterns = whole_words(needles)

    def look(where: str, name: str, data: bytes) -> None:
        text = name.lower().encode() + b"\0" + _readable(name, data).lower()
        for needle, pattern in patterns:
            if pattern.search(text):
                hits.setdefault(needle, []).append(where)

    for root in paths:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            look(str(path), str(path), data)
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for member in tar.getmembers():
                        look(f"{path}:{member.name}", member.name, tar.extractfile(member).read())
    return hits


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_an_export_full_of_identifiers_leaves_none_in_anything_ingestion_or_validation_writes(tmp_path, layout, capsys):
    raw, uids = hospital_export(tmp_path / "export")
    out, report = tmp_path / "work" / "slices", tmp_path / "work" / "validation"
    assert ingest_main(["ct", "--raw", str(raw), "--out", str(out), "--layout", layout, "--on-error", "quarantine",
                        "--label", "calcified", "--label", "normal", "--val-fraction", "0.5"]) == 0
    suite = "ct_slices"
    assert validate_main(["--dataset", str(out), "--report-dir", str(report), "--suite", suite]) == 0
    console = capsys.readouterr()
    needles = identifiers() | uids
    assert scan([tmp_path / "work"], needles) == {}
    assert not any(n.lower() in (console.out + console.err).lower() for n in needles)

    summary = json.loads((out / "ingest.json").read_text())
    # 2 patients x (4 slices + burned-in + secondary capture) + a hidden copy = 13 inputs.
    assert {k: summary[k] for k in ("inputs", "used", "skipped", "quarantined")} == \
        {"inputs": 13, "used": 7, "skipped": 5, "quarantined": 1}
    skipped = pd.read_csv(out / "skipped.csv").reason.tolist()
    assert sum(r.startswith("BurnedInAnnotation YES: text burned into the pixels") for r in skipped) == 2
    assert sum(r.startswith("secondary capture") for r in skipped) == 2
    rows = _rows(out, layout)
    assert set(rows.label) == {"calcified", "normal"}  # declared classes keep their names
    assert all(p.startswith("pt-") for p in rows.patient_id) and all(s.startswith("se-") for s in rows.series_uid)
    assert rows.groupby("patient_id").split.nunique().max() == 1  # a patient in one split
    # The steward's mapping, beside the key and outside the dataset, names them back.
    names = Pseudonyms.load()
    assert names.mapping.parent == Path(os.environ[KEY_ENV]).parent and out not in names.mapping.parents
    assert names.mapping.stat().st_mode & 0o077 == 0  # owner-only, as the key
    back = reveal(sorted(set(rows.patient_id)), names.mapping)
    assert sorted(original for _, original in back.values()) == ["MRN-00142", "MRN-00977"]
    source = rows.source.iloc[0]
    assert reveal([source], names.mapping)[source][1].startswith(("calcified/Doe_Jane", "normal/Roe_Richard"))


def _rows(out: Path, layout: str) -> pd.DataFrame:
    if layout == "folder":
        return pd.read_csv(out / "manifest.csv")
    return pd.concat([shard_metadata(p, p.name) for p in sorted((out / "shards").rglob("*.tar"))])


def test_the_same_patient_has_the_same_pseudonym_in_every_ingest_and_another_site_key_gives_others(tmp_path, monkeypatch):
    raw, _ = hospital_export(tmp_path / "export", slices=3)
    ingest = ["ct", "--raw", str(raw), "--layout", "folder", "--on-error", "quarantine", "--val-fraction", "0.5"]
    seen = []
    for out in ("a", "b"):
        assert ingest_main([*ingest, "--out", str(tmp_path / out)]) == 0
        seen.append(pd.read_csv(tmp_path / out / "manifest.csv"))
    assert seen[0][["path", "source", "patient_id", "series_uid", "split", "label"]].equals(
        seen[1][["path", "source", "patient_id", "series_uid", "split", "label"]])
    # Undeclared top folders are pseudonymised like any folder: a class folder can't be told from a patient's.
    assert all(label.startswith("d-") for label in seen[0].label)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other-site" / "key"))
    new_key(tmp_path / "other-site" / "key")
    assert ingest_main([*ingest, "--out", str(tmp_path / "c")]) == 0
    other = pd.read_csv(tmp_path / "c" / "manifest.csv")
    for column in ("source", "patient_id", "series_uid", "label"):
        assert not set(other[column]) & set(seen[0][column]), column


def test_identifiers_that_cannot_be_read_are_named_by_the_files_content_never_left_empty(tmp_path):
    raw = tmp_path / "export" / "anonymous"
    raw.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Nobody^Known"
    for keyword in ("PatientID", "SeriesInstanceUID"):
        delattr(ds, keyword)
    ds.save_as(raw / "IM0001")
    assert ingest_main(["ct", "--raw", str(tmp_path / "export"), "--out", str(tmp_path / "out"), "--layout", "folder"]) == 0
    [row] = pd.read_csv(tmp_path / "out" / "manifest.csv").to_dict("records")
    assert row["patient_id"].startswith("pt-") and row["series_uid"].startswith("se-")
    back = reveal([row["patient_id"], row["series_uid"]], Pseudonyms.load().mapping)
    assert {original for _, original in back.values()} == {f"content md5 {file_md5(raw / 'IM0001')}"}
    assert scan([tmp_path / "out"], {"Nobody", str(ds.StudyInstanceUID)}) == {}


def test_without_a_usable_site_key_nothing_is_ingested_and_one_line_says_what_to_do(tmp_path, monkeypatch, capsys):
    raw, _ = hospital_export(tmp_path / "export", slices=2)
    out = tmp_path / "out"
    command = ["ct", "--raw", str(raw), "--out", str(out)]
    missing = tmp_path / "keys" / "site-key"
    monkeypatch.setenv(KEY_ENV, str(missing))
    assert ingest_main(command) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ingest: no site key at {missing} ({KEY_ENV}): create one with `python -m data.privacy new-key`")
    assert not out.exists() and not (tmp_path / "keys").exists()

    missing.parent.mkdir()
    missing.write_text("not a key\n")
    assert ingest_main(command) == 2
    assert capsys.readouterr().err.strip() == f"ingest: {missing}: expected a site key of 64 hex characters " \
                                              "(`python -m data.privacy new-key` writes one)"
    missing.unlink()
    from data.privacy import main as privacy_main

    assert privacy_main(["new-key"]) == 0 and oct(missing.stat().st_mode & 0o777) == "0o600"
    key = missing.read_text()
    assert privacy_main(["new-key"]) == 0 and missing.read_text() == key  # kept: a new key renames every patient
    assert "site key kept" in capsys.readouterr().out
    # A key or mapping kept with the data would travel with it.
    monkeypatch.setenv(MAP_ENV, str(out / "pseudonyms.csv"))
    assert ingest_main(command) == 2
    assert "the pseudonym mapping lies inside" in capsys.readouterr().err and not out.exists()


def _name_patients(offset: int, mapping: str, key: str, start, base: int = 0) -> None:
    os.environ[KEY_ENV], os.environ[MAP_ENV] = key, mapping
    start.wait()
    for batch in range(30):  # thirty ingests, their patients overlapping other processes'
        names = Pseudonyms.load()
        for i in range(60):
            names.of("patient", f"MRN-{base + (offset + 10 * batch + i) % 300:05d}")
        names.save()


def test_ingests_running_at_once_each_add_their_pseudonyms_to_the_mapping_once(tmp_path):
    key, mapping = tmp_path / "key", tmp_path / "pseudonyms.csv"
    new_key(key)
    # Forked: a spawned child would import this module, Great Expectations with it (seconds each).
    context = multiprocessing.get_context("fork")
    done = context.Barrier(4)
    workers = [context.Process(target=_name_patients, args=(offset, str(mapping), str(key), done))
               for offset in (0, 50, 100, 150)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    table = pd.read_csv(mapping)
    assert list(table.columns) == ["pseudonym", "kind", "original"]
    assert table.pseudonym.is_unique and len(table) == 300  # MRN-00000 ... MRN-00299, each once
    assert set(table.original) == {f"MRN-{i:05d}" for i in range(300)}
    # A save waits for the one under way, whose lock this process holds here: deterministic,
    # where four processes racing may happen not to overlap.
    start = context.Barrier(2)
    waiting = context.Process(target=_name_patients, args=(0, str(mapping), str(key), start, 1000))
    waiting.start()  # before the lock is taken: a forked child would hold this process's descriptor of it
    with open(mapping, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start.wait()
        time.sleep(1.0)
        assert waiting.is_alive() and len(pd.read_csv(mapping)) == 300
    waiting.join(60)
    assert waiting.exitcode == 0 and len(pd.read_csv(mapping)) == 300 + 300  # MRN-01000 ... MRN-01299


def test_a_slide_in_a_patient_folder_with_a_label_image_leaves_no_name_and_its_label_is_never_read(
        slide, tmp_path, monkeypatch, capsys):  # noqa: F811
    assert set(openslide.OpenSlide(slide).associated_images) >= {"label", "macro"}  # what a glass label shows
    raw = tmp_path / "export" / "Doe_Jane_MRN-00142"
    raw.mkdir(parents=True)
    shutil.copy(slide, raw / "S22-04411 Doe^Jane.svs")
    shutil.copy(slide, raw / "S22-04412 Doe^Jane.svs")  # a second block, without annotations
    half = {"type": "Feature", "properties": {"classification": {"name": "tumor"}},
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1110, 0], [1110, 2967], [0, 2967], [0, 0]]]}}
    (raw / "S22-04411 Doe^Jane.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [half]}))
    cases = tmp_path / "cases.csv"
    pd.DataFrame({"slide": [f"Doe_Jane_MRN-00142/S22-0441{i} Doe^Jane.svs" for i in (1, 2)],
                  "case": ["MRN-00142"] * 2}).to_csv(cases, index=False)

    def tripwire(*args, **kwargs):
        raise AssertionError("a slide's label or macro image was read")

    monkeypatch.setattr(openslide.lowlevel, "read_associated_image", tripwire)
    monkeypatch.setattr(openslide.lowlevel, "get_associated_image_names", tripwire)
    out = tmp_path / "work" / "tiles"
    assert ingest_main(["he", "--raw", str(tmp_path / "export"), "--out", str(out), "--magnifications", "10", "5",
                        "--tile-size", "64", "--cases", str(cases), "--workers", "1", "--val-fraction", "0", "--layout", "folder"]) == 0
    console = capsys.readouterr()
    # The slide's own properties name its scan: none of it is written either.
    props = openslide.OpenSlide(slide).properties
    needles = {"Doe", "Jane", "MRN-00142", "00142", "S22-04411", "S22-04412", props["aperio.ImageID"],
               props["aperio.User"], props["aperio.Filename"]}
    assert scan([tmp_path / "work"], needles) == {}
    assert not any(n.lower() in (console.out + console.err).lower() for n in needles)
    tiles = pd.read_csv(out / "manifest.csv")
    assert set(tiles.case) == {Pseudonyms.load().of("case", "MRN-00142")} and tiles.source.nunique() == 2
    assert {"tumor", "unlabelled"} <= set(tiles.label)
    assert (np.asarray(tiles.magnification.unique()) == [10.0, 5.0]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_written(root: Path, before: dict[Path, int], skip: set[Path]) -> list[Path]:
    """Files under ``root`` that are new or changed since ``before`` (path -> mtime), but not
    under ``skip`` nor git's own objects."""
    written = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink() or ".git" in path.relative_to(root).parts:
            continue
        if any(path == s or s in path.parents for s in skip):
            continue
        if before.get(path) != path.stat().st_mtime_ns:
            written.append(path)
    return written


@pytest.mark.slow
def test_the_whole_path_from_an_identified_export_writes_no_identifier_anywhere(tmp_path):
    """Ingest, validate, push, pretrain, evaluate (folds by patient), fit heads, promote through
    the gates, serve, and the portal's pages: every file written in the checkout (MLflow's store
    and artifacts, the DVC cache and remote, the dataset), every command's output, every answer
    of the service and every page holds none of the export's identifiers. Only the raw export
    (imported, never pushed) and the steward's mapping (beside the site key) hold them."""
    from portal.app import Settings
    from tests.conftest import copy_checkout, signed_in_portal

    checkout = tmp_path / "repo"
    checkout.mkdir()
    copy_checkout(checkout)
    gates = checkout / "configs/promotion.yaml"
    config = yaml.safe_load(gates.read_text())
    # This family's own split for the promotion service; identical phantom slices leave nothing
    # to learn, and learning is not what this test is about.
    config["evaluation"]["families"] = {"ctp": {"data": "data/ctp/tiles/shards", "knn_k": 3,
                                                "validation_report": "data/ctp/validation/report.json"}}
    config["learning"]["min_gain"] = -1.0
    gates.write_text(yaml.safe_dump(config))
    subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@x", "commit", "-qam", "gates"], cwd=checkout, check=True)
    before = {p: p.stat().st_mtime_ns for p in checkout.rglob("*") if p.is_file()}
    raw, uids = hospital_export(tmp_path / "export", slices=6, patients=WHOLE_PATH)
    site = tmp_path / "site"
    site.mkdir()
    (site / "site-key").write_text(WHOLE_PATH_KEY + "\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VF_"))},
           KEY_ENV: str(site / "site-key"), "MLFLOW_TRACKING_URI": f"sqlite:///{checkout / 'mlflow.db'}"}
    said = []

    def run(*command: str) -> None:
        done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        said.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"

    data = ["-P", "data=data/ctp/tiles/shards", "-P", "validation_report=data/ctp/validation/report.json"]
    mlflow_run = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "ctp"]
    run(sys.executable, "-m", "data.dataset", "add", "ctp", "--modality", "ct", "--source", str(raw), "--label", "calcified",
        "--label", "normal", "--on-error", "quarantine", "--val-fraction", "0.5")
    run("dvc", "repro", "data/ctp/dvc.yaml")
    run("dvc", "push")
    run(*mlflow_run, "-e", "pretrain", "-P", "name=ctp", "-P", "data=data/ctp/tiles/shards/train",
        "-P", "validation_report=data/ctp/validation/report.json", "-P", f"overrides={tiny_overrides(epochs=1, steps_per_epoch=3)}")
    run(*mlflow_run, "-e", "evaluate", "-P", "model=models:/ctp-backbone/1", *data, "-P", "masks=", "-P", "targets=",
        "-P", "knn_k=3", "-P", "folds=2", "-P", "group=patient")
    run(*mlflow_run, "-e", "heads", "-P", "name=ctp", "-P", "backbone=models:/ctp-backbone/1", *data, "-P", "masks=",
        "-P", "targets=", "-P", "knn_k=3")
    run(sys.executable, "-m", "registry.promote", "models:/ctp-backbone/1", "--with", "models:/ctp-head/1",
        "--alias", "staging", "--reason", "privacy")
    run(sys.executable, "-m", "registry.lineage", "models:/ctp-head@staging")

    shard = next((checkout / "data/ctp/tiles/shards/val").glob("*.tar"))
    with tarfile.open(shard) as tar:
        tile = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    answers = []
    port = _free_port()
    server = subprocess.Popen(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=checkout, env={**env, "VF_MODEL_NAME": "ctp", "VF_MODEL_ALIAS": "staging"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(180):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert server.poll() is None, server.stdout.read()[-3000:]
            time.sleep(1)
        for route in ("classify", "embed"):
            answer = httpx.post(f"{base}/{route}", files={"images": ("slice.png", tile, "image/png")}, timeout=60)
            assert answer.status_code == 200, answer.text
            answers.append(answer.text)
        assert json.loads(answers[0])["predictions"][0]["label"] in ("calcified", "normal")
        answers += [httpx.get(f"{base}/{path}", timeout=10).text for path in ("docs.json", "readyz")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        said.append(server.communicate(timeout=60)[0])

    _, web = signed_in_portal(Settings(database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="t",
                                       tracking_uri=env["MLFLOW_TRACKING_URI"], project_dir=checkout, run_jobs=False,
                                       mlflow_ui_url="http://mlflow.test"))
    dataset = web.post("/api/datasets", json={"name": "ctp", "prefix": "datasets/ctp", "train_path": "data/ctp/tiles/shards/train",
                                              "validation_report": "data/ctp/validation/report.json"})
    assert dataset.status_code in (200, 201), dataset.json
    pages = [f"/datasets/{dataset.json['id']}", "/datasets", "/registry", "/jobs", "/audit"]
    for name in ("ctp-backbone", "ctp-head"):
        pages += [f"/registry/{name}", f"/registry/{name}/1/validation-report", f"/registry/{name}/monitoring",
                  f"/api/models/{name}", f"/api/models/{name}/1/validation-report"]
    for page in pages:
        shown = web.get(page)
        assert shown.status_code == 200, (page, shown.status_code)
        answers.append(shown.get_data(as_text=True))

    # The raw export's copy in DVC's cache is the raw store: identified, as exported, never pushed.
    raw_objects = {file_md5(p) for p in raw.rglob("*") if p.is_file()}
    raw_listing = yaml.safe_load((checkout / "data/ctp/raw.dvc").read_text())["outs"][0]["md5"]
    cache = checkout / ".dvc/cache/files/md5"
    skip = {checkout / "data/ctp/raw", *(cache / m[:2] / m[2:] for m in raw_objects | {raw_listing})}
    written = _files_written(checkout, before, skip)
    assert any(p.name == "mlflow.db" for p in written) and any("mlruns" in p.parts for p in written)
    remote = [p for p in (checkout / ".dvc-storage").rglob("*") if p.is_file()]
    assert remote and not {p.parent.name + p.name for p in remote} & (raw_objects | {raw_listing})  # raw never pushed
    needles = identifiers(WHOLE_PATH) | uids
    assert scan(written, needles) == {}
    texts = "\n".join(said + answers).lower().encode()
    assert [n for n, pattern in whole_words(needles) if pattern.search(texts)] == []
    # What the steward holds, and only there: the mapping beside the key.
    mapping = site / "pseudonyms.csv"
    assert {"MRN-00142", "MRN-00977", "MRN-00321", "MRN-00654"} <= set(pd.read_csv(mapping).original)


@pytest.mark.parametrize("kind", ["rgb", "ct", "he"])
def test_a_raw_folder_that_is_not_there_is_one_line_before_any_view_is_made(tmp_path, kind, capsys):
    missing = tmp_path / "nowhere"
    assert ingest_main([kind, "--raw", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"ingest: {missing}: raw data directory not found"
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.pseudonymous" / "raw").exists()


def _ingest_into(raw: str, out: str) -> None:
    sys.exit(ingest_main(["ct", "--raw", raw, "--out", out, "--layout", "folder", "--on-error", "quarantine"]))


def test_two_ingests_of_one_dataset_at_once_take_turns_with_the_view(tmp_path):
    raw, _ = hospital_export(tmp_path / "export", slices=6)
    out = tmp_path / "slices"
    context = multiprocessing.get_context("fork")
    both = [context.Process(target=_ingest_into, args=(str(raw), str(out))) for _ in range(2)]
    for ingest in both:
        ingest.start()
    for ingest in both:
        ingest.join(120)
    assert [i.exitcode for i in both] == [0, 0]
    summary = json.loads((out / "ingest.json").read_text())
    assert (summary["used"], summary["quarantined"]) == (11, 1)
    assert len(pd.read_csv(out / "manifest.csv")) == 11 and not (tmp_path / ".slices.pseudonymous" / "raw").exists()
