"""Where an input for inference comes from: a local file or folder, an ``s3://`` object or prefix
(endpoint and credentials from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... as boto3 reads
them), or a zip of a DICOM series. What is fetched or unpacked goes to a folder the caller owns."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from data.inputs import IngestError, file_md5, within
from data.wsi import SLIDE_SUFFIXES

# A zip of one CT series is hundreds of MiB; one that unpacks past this is refused before a byte is written.
MAX_UNZIPPED_BYTES = 16 << 30
MAX_ZIP_MEMBERS = 100_000


def _s3(uri: str) -> tuple[object, str, str]:
    import boto3  # only for s3:// inputs

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise IngestError(uri, "expected s3://<bucket>/<key or prefix>")
    return boto3.client("s3"), bucket, key


def fetch(source: str | Path, into: Path) -> Path:
    """A local path for ``source``: itself when local, else a copy under ``into`` of the object
    (or of every object under the prefix) it names."""
    text = str(source)
    if not text.startswith("s3://"):
        path = Path(text)
        if not path.exists():
            raise IngestError(path, "not found (expected a file, a folder, a .zip or s3://bucket/key)")
        return path
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = _s3(text)
    try:
        listed = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
                  for o in page.get("Contents", [])]
        if key in listed:  # one object
            target = into / Path(key).name
            client.download_file(bucket, key, str(target))
            return target
        prefix = key.rstrip("/") + "/" if key else ""
        members = [k for k in listed if k.startswith(prefix) and not k.endswith("/")]
        if not members:
            raise IngestError(text, "no object at that key or under that prefix")
        folder = into / (Path(key.rstrip("/")).name or bucket)
        for member in members:
            target = within(folder, member[len(prefix):]) if prefix else within(folder, member)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, member, str(target))
        return folder
    except (BotoCoreError, ClientError) as exc:
        raise IngestError(text, f"could not be read from S3 ({type(exc).__name__}: {exc})") from None


def unpacked(archive: Path, into: Path) -> Path:
    """The files of a zip under ``into``; names that would land outside it, and archives that
    unpack past ``MAX_UNZIPPED_BYTES`` or hold more than ``MAX_ZIP_MEMBERS`` files, are refused."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise IngestError(archive, f"{len(members)} files; at most {MAX_ZIP_MEMBERS} in one series")
            if (total := sum(m.file_size for m in members)) > MAX_UNZIPPED_BYTES:
                raise IngestError(archive, f"unpacks to {total} bytes; at most {MAX_UNZIPPED_BYTES}")
            folder = into / archive.stem
            for member in members:
                target = within(folder, member.filename)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            return folder
    except (zipfile.BadZipFile, OSError) as exc:
        raise IngestError(archive, f"not a readable zip archive ({exc})") from None


def _slides_under(uri: str) -> list[str]:
    """The slide objects directly under an ``s3://`` prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = _s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as exc:
        raise IngestError(uri, f"could not be listed ({type(exc).__name__}: {exc})") from None
    return [f"s3://{bucket}/{k}" for k in sorted(keys) if Path(k).suffix.lower() in SLIDE_SUFFIXES]


def cohort(source: str) -> list[str]:
    """The inputs ``source`` names: a text file lists one per line (``#`` comments; a CSV's first
    column), a folder or ``s3://`` prefix holding slide files is those slides; anything else (a
    slide, a series' folder or prefix) is one input."""
    if source.startswith("s3://") and Path(source).suffix.lower() not in SLIDE_SUFFIXES:
        return _slides_under(source) or [source]
    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".txt", ".csv", ".list"):
        lines = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
        listed = [line for line in lines if line and not line.startswith("#") and line != "input"]
        if not listed:
            raise IngestError(source, "lists no input (one path or s3:// URI per line)")
        return listed
    if path.is_dir() and (slides := sorted(str(p) for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)):
        return slides
    return [source]


def folder_md5(folder: Path) -> str:
    """One md5 of a folder's files, their relative names and contents: what a series' outputs
    are linked to."""
    digest = hashlib.md5()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_md5(path)}\n".encode())
    return digest.hexdigest()
