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
import re
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import yaml
from dvc.repo import Repo

from data.params import MODALITIES, IngestParams
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
            repo.imp_url(source, out=str(folder / "raw"), fs_config=fs_config)
    except Exception as exc:  # DVC, botocore and the network each fail their own way; none may leave a half dataset
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        cause = exc.__cause__ or exc
        where = f" at {endpoint_url}" if endpoint_url else ""
        raise DatasetError(f"source: {source}{where} could not be imported ({type(cause).__name__}: "
                           f"{one_line(cause)[:300]}); check the prefix, the endpoint and the credentials") from None
    if params.cases:
        shutil.copy(params.cases, folder / CASES)
        params = replace(params, cases=CASES)
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline(params), sort_keys=False))
    if params.sharded:  # this machine's memory of the inputs' md5, not the dataset's
        with open(folder / ".gitignore", "a") as ignore:
            ignore.write(f"/{inputs_memo(Path('tiles')).name}\n")
    return folder


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
    args = parser.parse_args(argv)

    def add() -> None:
        params = IngestParams.from_args(args.modality, args)
        folder = add_dataset(args.repo, args.name, args.source, params, args.endpoint_url)
        print(f"{folder}: raw data imported; build it with `dvc repro {folder / 'dvc.yaml'}`, "
              f"train on {folder / params.images}/train")

    return run_command("dataset", add)


if __name__ == "__main__":
    sys.exit(main())
