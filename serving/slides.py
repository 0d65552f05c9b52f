"""Slides uploaded to the service for whole-slide prediction: kept on disk under an id (never in
memory, never in BentoML's task store, which holds a task's request body), checked to be slides
before they are accepted, and removed a day after upload.

The server's starting process makes the folder (``VF_SLIDE_DIR``, unless the operator sets it to
storage of their choosing) and its workers inherit it, so a slide uploaded to one worker is found
by the task another worker runs.
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

SLIDE_DIR = "VF_SLIDE_DIR"
RETENTION_S = float(os.environ.get("VF_SLIDE_RETENTION_S", str(24 * 3600)))
_ID = re.compile(r"[0-9a-f]{32}")


class SlideRefused(ValueError):
    """An upload that is not a slide, or an id that names none; the message names the field."""


def folder() -> Path:
    """The slide store, made for this server (and its workers) on first use."""
    if not os.environ.get(SLIDE_DIR):
        made = tempfile.mkdtemp(prefix="vision-foundry-slides-")
        os.environ[SLIDE_DIR] = made
    path = Path(os.environ[SLIDE_DIR])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _purge(store: Path) -> None:
    cutoff = time.time() - RETENTION_S
    for entry in store.iterdir():
        if entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def store(upload: BinaryIO, name: str) -> dict:
    """Keep the uploaded file (read from its start) as a slide under a new id: (id, name, bytes,
    md5, scan size). The file's ending must be a slide format's, since OpenSlide reads by it."""
    suffix = Path(name).suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        raise SlideRefused(f"slide: {name[:80]!r} is not a whole-slide image file (expected one of "
                           f"{', '.join(sorted(SLIDE_SUFFIXES))})")
    store_dir = folder()
    _purge(store_dir)
    slide_id = uuid.uuid4().hex
    target = store_dir / slide_id / f"slide{suffix}"
    target.parent.mkdir()
    digest = hashlib.md5()
    upload.seek(0)
    with open(target, "wb") as out:
        while chunk := upload.read(8 << 20):
            digest.update(chunk)
            out.write(chunk)
    try:
        slide, info = open_slide(target)
        slide.close()
    except IngestError as exc:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise SlideRefused(f"slide: {exc.problem}") from None
    return {"slide_id": slide_id, "name": Path(name).name, "bytes": target.stat().st_size, "md5": digest.hexdigest(),
            "width": info.width, "height": info.height, "objective_power": info.objective_power}


def find(slide_id: str) -> Path:
    if not _ID.fullmatch(slide_id or ""):
        raise SlideRefused("slide_id: expected the 32 hex digits /upload_slide answered")
    found = sorted((folder() / slide_id).glob("slide.*")) if (folder() / slide_id).is_dir() else []
    if not found:
        raise SlideRefused(f"slide_id: no slide {slide_id} (uploads are kept {RETENTION_S / 3600:g} h); upload it again")
    return found[0]
