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
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo

from data.inputs import CHANNELS
from data.versioning import find_repo_root
from dinomx.errors import MissingInput, UserError, run_command

MODALITIES = ("he", "ct", "rgb", "gray")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be added as asked."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class IngestParams:
    modality: str  # he | ct
    val_fraction: float = 0.2
    seed: int = 0
    magnifications: tuple[float, ...] = (20.0, 10.0, 5.0)
    tile_size: int = 224
    min_tissue: float = 0.5
    window: tuple[float, float] = (40.0, 400.0)
    channels: str = "single"  # ct: single | 2.5d | windows
    thickness: tuple[float, float] | None = None  # ct: series of this slice thickness only (mm)
    kernels: tuple[str, ...] = ()  # ct: series of these convolution kernels only

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise DatasetError(f"modality: expected one of {', '.join(repr(m) for m in MODALITIES)}, got {self.modality!r}")
        if self.channels not in CHANNELS:
            raise DatasetError(f"channels: expected one of {list(CHANNELS)}, got {self.channels!r}")

    @property
    def images(self) -> str:
        """The folder of the dataset that trains: grid tiles at the highest magnification, slices,
        or the converted image folder (each holding train/ and val/)."""
        return {"he": f"tiles/{max(self.magnifications):g}x", "ct": "tiles/slices"}.get(self.modality, "tiles")


def _join(args: list) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def pipeline(params: IngestParams) -> dict:
    """The dvc.yaml of one dataset (paths relative to ``data/<name>/``)."""
    common = ["--val-fraction", params.val_fraction, "--seed", params.seed]
    if params.modality == "he":
        mags = [f"{m:g}" for m in params.magnifications]
        ingest = ["--magnifications", *mags, "--tile-size", params.tile_size, "--min-tissue", params.min_tissue]
        validate = ["--suite", "he_tiles", "--tile-size", params.tile_size, "--magnifications", *mags,
                    "--min-tissue", params.min_tissue]
    elif params.modality == "ct":
        ingest = ["--window", *params.window, "--channels", params.channels,
                  *(["--thickness", *params.thickness] if params.thickness else []),
                  *[a for kernel in params.kernels for a in ("--kernel", kernel)]]
        validate = ["--suite", "ct_slices" if params.channels == "single" else "ct_slices_stacked"]
    else:
        ingest = []
        validate = ["--suite", f"images_{params.modality}"]
    return {"stages": {
        "ingest": {
            "cmd": _join(["python", "-m", "data.ingest", params.modality, "--raw", "raw", "--out", "tiles", *ingest, *common]),
            "deps": ["raw"],
            "outs": ["tiles"],
        },
        "validate": {
            # Exits non-zero when the suite fails, which stops `dvc repro`; the report stays.
            "cmd": _join(["python", "-m", "data.validate", "--dataset", "tiles", "--report-dir", "validation", *validate]),
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
    except DvcException as exc:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        cause = exc.__cause__ or exc
        raise DatasetError(f"source: {source} could not be imported ({type(cause).__name__}: {cause}); "
                           "check the prefix and the endpoint") from None
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline(params), sort_keys=False))
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
    add.add_argument("--val-fraction", type=float, default=0.2)
    add.add_argument("--magnifications", type=float, nargs="+", default=[20, 10, 5])
    add.add_argument("--tile-size", type=int, default=224)
    add.add_argument("--min-tissue", type=float, default=0.5)
    add.add_argument("--window", type=float, nargs=2, default=[40, 400], metavar=("CENTER", "WIDTH"))
    add.add_argument("--channels", choices=CHANNELS, default="single", help="ct: grey slices, 2.5d or three windows")
    add.add_argument("--thickness", type=float, nargs=2, metavar=("MIN", "MAX"), help="ct: keep series of this thickness (mm)")
    add.add_argument("--kernel", action="append", default=[], help="ct: keep series of this kernel (repeatable)")
    args = parser.parse_args(argv)

    def add() -> None:
        params = IngestParams(modality=args.modality, val_fraction=args.val_fraction,
                              magnifications=tuple(args.magnifications), tile_size=args.tile_size,
                              min_tissue=args.min_tissue, window=tuple(args.window), channels=args.channels,
                              thickness=tuple(args.thickness) if args.thickness else None, kernels=tuple(args.kernel))
        folder = add_dataset(args.repo, args.name, args.source, params, args.endpoint_url)
        print(f"{folder}: raw data imported; build it with `dvc repro {folder / 'dvc.yaml'}`, "
              f"train on {folder / params.images}/train")

    return run_command("dataset", add)


if __name__ == "__main__":
    sys.exit(main())
