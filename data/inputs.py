"""What ingestion refuses or skips, how it says so, and how inputs are named in a dataset."""
from __future__ import annotations

import contextvars
import hashlib
import os
import re
from pathlib import Path

from dinomx.errors import UserError

# File endings that say "not an image of this dataset" before anything is opened: exports carry
# reports, indexes and desktop clutter beside the images.
NOT_IMAGES = {".pdf", ".xml", ".txt", ".json", ".csv", ".md", ".html", ".htm", ".db", ".ini", ".log", ".zip",
              ".rtf", ".doc", ".docx", ".xls", ".xlsx", ".geojson", ".ds_store", ".lnk", ".sh", ".bat", ".exe"}


# Beside a dataset's manifest: the inputs left out as not images of it, with the reason
# (``<out>.skipped.csv`` beside the dataset when none was an image); the inputs refused
# (``<out>.refused.csv`` beside the dataset) or quarantined (inside it), with theirs; and the counts
# (inputs = used + skipped + quarantined).
SKIPPED = "skipped.csv"
REFUSED = "refused.csv"
SUMMARY = "ingest.json"
# How CT slices become images: one window as grey, or three channels for an RGB backbone.
CHANNELS = ("single", "2.5d", "windows")


class IngestError(UserError, ValueError):
    """A raw input the platform will not ingest; the message names the file and what was expected."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Skipped(Exception):
    """An input that is not an image of the dataset (a report, an index, a scout): left out with
    ``reason``, recorded in ``skipped.csv``, never a refusal of the dataset."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


# Pseudonymous views open in this context (``data.privacy``): view root -> the raw folder it
# mirrors. A view's links point outside it by construction; what they may reach is the raw folder.
VIEWS: contextvars.ContextVar[dict[Path, Path] | None] = contextvars.ContextVar("views", default=None)


def within(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved, symlinks included; refuses anything
    that lands outside ``root``, so a crafted name or link never reaches another dataset. In a
    pseudonymous view the bound is the raw folder it mirrors, and the path stays the view's."""
    root = Path(root).resolve()
    origin = (VIEWS.get() or {}).get(root)
    resolved = (root / path).resolve()
    bounds = (root,) if origin is None else (root, origin)  # a view's own folders, and where its links lead
    if not any(resolved == bound or bound in resolved.parents for bound in bounds):
        raise IngestError(path, f"escapes the dataset root {origin or root}")
    return resolved if origin is None else Path(os.path.normpath(root / path))


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def output_stem(relative: str | Path) -> str:
    """A file-name stem for the outputs of the input at ``relative`` (inside the raw folder),
    unique and stable whatever the names: the whole relative path, readable, and a hash of it.
    PACS exports name files by SOP Instance UID (dots, no extension) and slides repeat names in
    case folders (``caseA/HE.svs``, ``caseB/HE.svs``); cutting a suffix or keeping only the file
    name would give two inputs one output."""
    text = Path(relative).as_posix()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__"))[:96]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
