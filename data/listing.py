"""What an ingestion found among its inputs: the source files, what it skips and refuses and why
(each input with its own reason, listed in CSV beside or inside the dataset), and the split each
case or patient falls in."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data.inputs import IngestError, Skipped, within
from data.params import ON_ERROR
from dinomx.errors import DataError, UserError

UNLABELLED = "unlabelled"
SHOWN = 5  # refusals written out in a message; the CSV has them all


def _shown(entries: list[IngestError | Skipped]) -> str:
    lines = "\n".join(f"  - {e}" for e in entries[:SHOWN])
    more = f"\n  ... and {len(entries) - SHOWN} more" if len(entries) > SHOWN else ""
    return f":\n{lines}{more}"


class IngestFailed(UserError, RuntimeError):
    """Some inputs were refused; nothing was written. ``errors`` holds one IngestError per input."""

    def __init__(self, errors: list[IngestError], listing: Path | None = None, inputs: int | None = None,
                 quarantined: bool = False):
        self.errors, self.listing = errors, listing
        where = f"; every one with its reason in {listing}" if listing else ""
        of = f" of {inputs}" if inputs is not None else ""
        then = ("; --on-error quarantine left no input to build from" if quarantined
                else " (--on-error quarantine builds the dataset from the rest)")
        super().__init__(f"{len(errors)}{of} input(s) refused, nothing written{where}{then}{_shown(errors)}")


class NothingToIngest(UserError, RuntimeError):
    """No input is an image of the kind asked for (a folder of reports, MR where CT was asked):
    nothing was written, and ``listing`` says why each was skipped."""

    def __init__(self, raw: Path, skipped: list[Skipped], listing: Path):
        self.skipped, self.listing = skipped, listing
        super().__init__(f"{raw}: no images among its {len(skipped)} input(s), nothing written; every one was skipped, "
                         f"with its reason in {listing}{_shown(skipped)}")


class IngestErrors(Exception):
    """Several inputs of one unit (a CT series) refused at once, each with its own reason."""

    def __init__(self, errors: list[IngestError]):
        self.errors = errors
        super().__init__("; ".join(map(str, errors)))


@dataclass
class Partial:
    """A unit kept without some of its inputs (a CT series' unreadable slices), which are set
    aside each with its own reason."""

    rows: list[dict]
    set_aside: list[IngestError]


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """Deterministic split per case / patient, so no patient lands in both train and val."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def source_files(raw: Path) -> tuple[list[Path], list[Skipped]]:
    """Files under ``raw``, and the hidden ones (a name or folder starting with "."), skipped with
    the reason: desktop clutter (``.DS_Store``, ``._x``) mostly, but an export's ``.IM0002`` is a
    slice the user should see was left out. A link that points outside ``raw`` is refused."""
    if not raw.is_dir():
        raise IngestError(raw, "raw data directory not found")
    files, hidden = [], []
    for path in sorted(raw.rglob("*")):
        relative = path.relative_to(raw)
        if path.is_dir():
            continue
        if any(part.startswith(".") for part in relative.parts):
            hidden.append(Skipped(path, "hidden file (a name starting with '.'); rename it to ingest it"))
            continue
        within(raw, relative)
        files.append(path)
    if not files:
        raise IngestError(raw, "no input files found" + (f" (only {len(hidden)} hidden file(s))" if hidden else ""))
    return files, hidden


def sort_out(files: list[Path], wanted: Callable[[Path], bool], kind: str) -> tuple[list[Path], list[Skipped]]:
    """Files of the modality, and the rest skipped by their ending."""
    kept, skipped = [], []
    for path in files:
        if wanted(path):
            kept.append(path)
        else:
            skipped.append(Skipped(path, f"not a {kind} file ({path.suffix or 'no extension'})"))
    return kept, skipped


def resolve(raw: str | Path, out: str | Path) -> tuple[Path, Path]:
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise IngestError(out, f"output must not overlap the raw data directory {raw}")
    return raw, out


def listing(raw: Path, entries: list[Skipped | IngestError]) -> pd.DataFrame:
    def relative(path: str) -> str:
        try:
            return Path(path).relative_to(raw).as_posix()
        except ValueError:
            return path
    return pd.DataFrame([{"source": relative(e.path), "reason": getattr(e, "reason", None) or e.problem} for e in entries],
                        columns=["source", "reason"])


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise DataError(f"on_error: expected one of {list(ON_ERROR)}, got {on_error!r}")


def dropped_whole(files: list[str], errors: list[IngestError]) -> list[IngestError]:
    """``errors`` of some of a unit's ``files`` (a series, a slide's levels or annotations), and
    the rest of them refused with it: a unit is used whole or not at all."""
    failed = {e.path for e in errors}
    first = errors[0]
    return errors + [IngestError(f, f"goes with {Path(first.path).name}, refused: {first.problem}")
                     for f in sorted(set(files) - failed)]
