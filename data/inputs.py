"""What ingestion refuses, and how it says so."""
from __future__ import annotations

from pathlib import Path

from dinomx.errors import UserError


class IngestError(UserError, ValueError):
    """A raw input the platform will not ingest; the message names the file and what was expected."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def within(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved, symlinks included; refuses anything
    that lands outside ``root``, so a crafted name or link never reaches another dataset."""
    root = Path(root).resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise IngestError(path, f"escapes the dataset root {root}")
    return resolved
