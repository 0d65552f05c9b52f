"""Whole slides and CT series uploaded to the service for prediction: kept on disk under an id
(never in memory, never in BentoML's task store, which holds a task's request body), checked to be
what they claim before they are accepted (a slide OpenSlide opens; a zip of one CT series that is
one volume), and removed ``VF_UPLOAD_RETENTION_S`` (a day) after upload.

The server's starting process makes the folder (``VF_UPLOAD_DIR``, unless the operator sets it to
storage of their choosing) and its workers inherit it, so an upload to one worker is found by the
task another worker runs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from data.inputs import IngestError
from data.wsi import SLIDE_SUFFIXES, open_slide

UPLOAD_DIR = "VF_UPLOAD_DIR"
RETENTION_S = float(os.environ.get("VF_UPLOAD_RETENTION_S", str(24 * 3600)))
KINDS = ("slide", "series")
_ID = re.compile(r"[0-9a-f]{32}")


class UploadRefused(ValueError):
    """An upload that is not what its route takes, or an id that names none; the message names the field."""


def folder() -> Path:
    """The upload store, made for this server (and its workers) on first use."""
    if not os.environ.get(UPLOAD_DIR):
        os.environ[UPLOAD_DIR] = tempfile.mkdtemp(prefix="vision-foundry-uploads-")
    path = Path(os.environ[UPLOAD_DIR])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _purge(store: Path) -> None:
    cutoff = time.time() - RETENTION_S
    for entry in store.iterdir():
        if entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _suffix(name: str, kind: str) -> str:
    suffix = Path(name).suffix.lower()
    allowed = SLIDE_SUFFIXES if kind == "slide" else {".zip"}
    if suffix not in allowed:
        what = "a whole-slide image file" if kind == "slide" else "a .zip of one CT series' DICOM files"
        raise UploadRefused(f"{kind}: {name[:80]!r} is not {what} (expected {', '.join(sorted(allowed))})")
    return suffix


def _check(target: Path, kind: str) -> dict:
    """What the upload is, once it is known to be one: the scan's size, or the series' geometry."""
    if kind == "slide":
        slide, info = open_slide(target)
        slide.close()
        return {"width": info.width, "height": info.height, "objective_power": info.objective_power}
    from data.sources import unpacked
    from data.volume import read_series

    return {"series": read_series(unpacked(target, target.parent)).geometry()}


def store(upload: BinaryIO, name: str, kind: str) -> dict:
    """Keep the uploaded file (read from its start) under a new id and check it: (id, name, bytes,
    md5, and what ``_check`` found). The file's ending says what it is: OpenSlide reads by it."""
    suffix = _suffix(name, kind)
    store_dir = folder()
    _purge(store_dir)
    upload_id = uuid.uuid4().hex
    target = store_dir / upload_id / f"{kind}{suffix}"
    target.parent.mkdir()
    digest = hashlib.md5()
    upload.seek(0)
    with open(target, "wb") as out:
        while chunk := upload.read(8 << 20):
            digest.update(chunk)
            out.write(chunk)
    try:
        found = _check(target, kind)
    except IngestError as exc:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise UploadRefused(f"{kind}: {exc.problem}") from None
    return {f"{kind}_id": upload_id, "name": Path(name).name, "bytes": target.stat().st_size, "md5": digest.hexdigest(),
            **found}


def find(upload_id: str, kind: str) -> Path:
    """The stored slide file, or the folder a series was unpacked to."""
    field = f"{kind}_id"
    if not _ID.fullmatch(upload_id or ""):
        raise UploadRefused(f"{field}: expected the 32 hex digits /upload_{kind} answered")
    stored = folder() / upload_id
    found = sorted(stored.glob(f"{kind}.*")) if stored.is_dir() else []
    if not found:
        raise UploadRefused(f"{field}: no {kind} {upload_id} (uploads are kept {RETENTION_S / 3600:g} h); upload it again")
    return found[0] if kind == "slide" else stored / found[0].stem
