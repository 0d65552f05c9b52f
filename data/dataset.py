"""Add a dataset that lives under an S3 prefix, any URL DVC reads, or a local folder to the repository.

``python -m data.dataset add <name> --modality he|ct|rgb|gray --source s3://bucket/prefix/`` (or
``--source ./folder``) imports the raw files with ``dvc import-url`` (``data/<name>/raw.dvc`` pins
their version; ``dvc update`` moves it)
and writes ``data/<name>/dvc.yaml`` with two stages: ``ingest`` (raw -> tiles or slices) and
``validate`` (Great Expectations; a failure stops ``dvc repro``). ``dvc repro data/<name>/dvc.yaml``
then builds the dataset, and ``data/<name>/dvc.lock`` holds the md5 every training run names.

An S3-compatible store (MinIO, PowerScale, SeaweedFS) is reached with ``--endpoint-url`` (recorded in
the ``.dvc`` file so ``dvc update`` finds it again) or ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import yaml
from dvc.repo import Repo

from data.annotations import PROVENANCE, read_regions
from data.annotations import proposers as annotated_by
from data.inputs import IngestError
from data.params import MODALITIES, IngestParams
from data.privacy import pseudonymous_folder
from data.shards import inputs_memo
from data.versioning import find_repo_root
from dinomx.errors import MissingInput, UserError, one_line, run_command


class DatasetError(UserError, ValueError):
    """A dataset that cannot be added as asked."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Beside the dataset's dvc.yaml: the case of each slide (``--cases``), a dependency of ingestion.
CASES = "cases.csv"


def _join(args: list) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def pipeline(params: IngestParams) -> dict:
    """The dvc.yaml of one dataset (paths relative to ``data/<name>/``)."""
    return {"stages": {
        "ingest": {
            "cmd": _join(["python", "-m", "data.ingest", params.modality, "--raw", "raw", "--out", "tiles", *params.argv()]),
            "deps": ["raw", *([params.cases] if params.cases else [])],
            # Kept while the stage runs: ingestion keeps the shards of slides and series that did
            # not change, so a new slide costs that slide.
            "outs": [{"tiles": {"persist": True}} if params.sharded else "tiles"],
        },
        "validate": {
            # Exits non-zero when the suite fails, which stops `dvc repro`; the report stays.
            "cmd": _join(["python", "-m", "data.validate", "--dataset", "tiles", "--report-dir", "validation",
                          *params.validate_argv()]),
            "deps": ["tiles"],
            "outs": ["validation"],
        },
    }}


def _import_unpushed(repo: Repo, source: str, out: Path, fs_config: dict | None) -> None:
    """``dvc import-url`` of what identifies patients (the raw export; the table of each slide's
    case, whose values are MRNs as often as not): pinned, ignored by git, and never pushed to the
    DVC remote that researchers pull the pseudonymised dataset from. It stays where the hospital
    put it, reached with the dataset's read grant."""
    stage = repo.imp_url(source, out=str(out), fs_config=fs_config)
    for output in stage.outs:
        output.can_push = False
    stage.md5 = stage.compute_md5()
    stage.dump()


def add_dataset(repo_root: str | Path, name: str, source: str, params: IngestParams,
                endpoint_url: str | None = None) -> Path:
    """Import ``source`` as ``data/<name>/raw`` and write the dataset's pipeline; returns its folder.
    A source that cannot be imported leaves nothing behind."""
    if not _NAME.match(name):
        raise DatasetError(f"name: expected lowercase letters, digits, _ or - (a folder name), got {name!r}")
    root = find_repo_root(Path(repo_root).resolve())
    folder = root / "data" / name
    if (folder / "dvc.yaml").exists() or (folder / "raw.dvc").exists():
        raise DatasetError(f"{folder}: dataset {name!r} exists; `dvc update {folder / 'raw.dvc'}` takes a new version")
    if params.cases and not Path(params.cases).is_file():
        raise MissingInput(f"cases: {params.cases} is not a file (expected a CSV with columns slide and case)")
    if "://" not in source:  # a local folder: imported (copied and pinned) like a remote one
        local = Path(source).expanduser().resolve()
        if not local.is_dir():
            raise MissingInput(f"source: {source} is not a folder (expected a local folder or s3://bucket/prefix)")
        if local == root or root in local.parents:
            raise DatasetError(f"source: {local} is inside the repository; give a folder outside it")
        source = str(local)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fs_config = {"endpointurl": endpoint_url} if endpoint_url else None
    try:
        with Repo(str(root)) as repo:
            _import_unpushed(repo, source, folder / "raw", fs_config)
            if params.cases:
                _import_unpushed(repo, str(Path(params.cases).resolve()), folder / CASES, None)
    except Exception as exc:  # DVC, botocore and the network each fail their own way; none may leave a half dataset
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        cause = exc.__cause__ or exc
        where = f" at {endpoint_url}" if endpoint_url else ""
        raise DatasetError(f"source: {source}{where} could not be imported ({type(cause).__name__}: "
                           f"{one_line(cause)[:300]}); check the prefix, the endpoint and the credentials") from None
    if params.cases:
        params = replace(params, cases=CASES)
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline(params), sort_keys=False))
    with open(folder / ".gitignore", "a") as ignore:
        # Ingestion's working folder beside the dataset, and (shards) this machine's memory of
        # the inputs' md5: neither is the dataset's.
        ignore.write(f"/{pseudonymous_folder(Path('tiles')).name}/\n")
        if params.sharded:
            ignore.write(f"/{inputs_memo(Path('tiles')).name}\n")
    return folder


ANNOTATIONS_FOLDER = "annotations"


def _feature_collection(path: Path) -> None:
    """A file QuPath exported as a FeatureCollection, whose regions read: else one error naming it."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid GeoJSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise DatasetError(f"{path}: expected a GeoJSON FeatureCollection (QuPath: File > Export objects as GeoJSON, "
                           f"'Export as FeatureCollection'), got {kind!r}")
    try:
        read_regions(path, lenient=True)
    except IngestError as exc:
        raise DatasetError(str(exc)) from None


def annotate(repo_root: str | Path, name: str, source: str | Path, proposed_by: str = "") -> Path:
    """Corrected annotations (``<slide path>.geojson`` files, as ``predict`` wrote them and
    annotators fixed them) become the annotations of dataset ``name``: copied to
    ``data/<name>/annotations/`` under DVC, read by its ingest stage, so ``dvc repro`` builds the
    new version, whose ``annotations.json`` (and the lineage of models trained on it) names the
    model versions that proposed the masks. Nothing changes unless every file reads."""
    root = find_repo_root(Path(repo_root).resolve())
    folder = root / "data" / name
    if not (folder / "dvc.yaml").is_file():
        raise DatasetError(f"{folder}: no dataset {name!r} (add it first: python -m data.dataset add {name} ...)")
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())
    ingest = stages["stages"]["ingest"]
    if "-m data.ingest he " not in ingest["cmd"]:
        raise DatasetError(f"{name}: annotations are GeoJSON regions of slides; this dataset's ingest stage is not "
                           f"slides ({ingest['cmd'][:80]})")
    source = Path(source)
    files = sorted(p for p in source.rglob("*.geojson") if p.is_file()) if source.is_dir() else []
    if not files:
        raise MissingInput(f"annotations: {source} holds no .geojson file (expected <slide path>.geojson per slide)")
    for path in files:
        _feature_collection(path)
    proposers = sorted({proposed_by} if proposed_by else set().union(*(annotated_by(p) for p in files)))
    staging = folder / f".{ANNOTATIONS_FOLDER}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for path in files:
        target = staging / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (staging / PROVENANCE).write_text(json.dumps({"proposed_by": proposers}, indent=2))
    shutil.rmtree(folder / ANNOTATIONS_FOLDER, ignore_errors=True)
    staging.rename(folder / ANNOTATIONS_FOLDER)
    if "--annotations" not in ingest["cmd"]:
        ingest["cmd"] += f" --annotations {ANNOTATIONS_FOLDER}"
        ingest["deps"] = [*ingest.get("deps", []), ANNOTATIONS_FOLDER]
        (folder / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    with Repo(str(root)) as repo:
        repo.add(str(folder / ANNOTATIONS_FOLDER))
    return folder / ANNOTATIONS_FOLDER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Add an S3-hosted dataset with its DVC pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="dvc import-url the raw data and write data/<name>/dvc.yaml")
    add.add_argument("name")
    add.add_argument("--source", required=True, help="s3://bucket/prefix/, any URL DVC can import, or a local folder")
    add.add_argument("--modality", required=True, choices=MODALITIES,
                     help="he (slides), ct (DICOM), rgb or gray (any image folder)")
    add.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, PowerScale, ...)")
    add.add_argument("--repo", default=".", help="repository root")
    IngestParams.add_arguments(add)
    notes = sub.add_parser("annotate", help="corrected GeoJSON annotations as the dataset's new annotations (dvc add)")
    notes.add_argument("name")
    notes.add_argument("--annotations", required=True, help="folder of <slide path>.geojson FeatureCollections")
    notes.add_argument("--proposed-by", default="", help="the model version that proposed the masks (default: the "
                       "proposed_by property predict wrote on their features)")
    notes.add_argument("--repo", default=".", help="repository root")
    args = parser.parse_args(argv)

    def add() -> None:
        params = IngestParams.from_args(args.modality, args)
        folder = add_dataset(args.repo, args.name, args.source, params, args.endpoint_url)
        print(f"{folder}: raw data imported; build it with `dvc repro {folder / 'dvc.yaml'}`, "
              f"train on {folder / params.images}/train")

    def annotated() -> None:
        folder = annotate(args.repo, args.name, args.annotations, args.proposed_by)
        print(f"{folder}: {len(list(folder.rglob('*.geojson')))} annotation file(s) under DVC; build the new version "
              f"with `dvc repro {folder.parent / 'dvc.yaml'}`")

    return run_command("dataset", add if args.command == "add" else annotated)


if __name__ == "__main__":
    sys.exit(main())
