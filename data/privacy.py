"""Pseudonyms for what ingestion writes: nothing derived from an export carries a patient identifier.

A site key (``python -m data.privacy new-key``; its path in ``VF_SITE_KEY``, by default
``~/.config/vision-foundry/site-key``) turns every identifier into a keyed pseudonym,
``<kind>-<HMAC-SHA256(key, kind, value), 16 hex>``: the same patient gets the same pseudonym in
every ingest on every machine holding the key, so patient-grouped splits and folds keep working,
and no one without the key can test a guess (an MRN has few enough values to try them all against
a plain hash).

- **Paths**: ingestion reads the raw folder through a view of links (``pseudonymous_view``) in
  which every folder and file name is a pseudonym (``d-...``, ``f-...``, the file's known ending
  kept); what it writes (manifest, shard names and sample keys, listings, messages) only ever
  sees those names. Folders that name a split or a class the user declared stay as they are.
- **DICOM identifiers** read from headers (patient, series, instance) become ``pt-``, ``se-``,
  ``in-``; an object whose identifier is missing gets one from its file's content hash, never the
  raw value. Nothing else of a header is written (no name, date, accession number, study).
- **The mapping back** (pseudonym -> original), for the data steward, is appended to
  ``pseudonyms.csv`` beside the key (``VF_PSEUDONYM_MAP`` moves it), never inside a dataset, so
  neither DVC nor MLflow ever holds it. ``python -m data.privacy reveal <pseudonym>...`` reads it.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hmac
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from data.inputs import NOT_IMAGES, VIEWS, IngestError
from data.wsi import SLIDE_SUFFIXES
from dinomx.errors import UserError, run_command
from dinomx.images import IMAGE_SUFFIXES

KEY_ENV = "VF_SITE_KEY"
MAP_ENV = "VF_PSEUDONYM_MAP"
DEFAULT_KEY = "~/.config/vision-foundry/site-key"
MAPPING = "pseudonyms.csv"
KEY_BYTES = 32
PREFIXES = {"patient": "pt", "series": "se", "instance": "in", "folder": "d", "file": "f", "case": "ca"}
# Endings a reader decides by (slide, image, DICOM, sidecar): kept on a file's pseudonym. Any
# other ending may be part of a name ("Doe.Jane", a UID's last component) and is not.
KEPT_SUFFIXES = NOT_IMAGES | SLIDE_SUFFIXES | IMAGE_SUFFIXES | {".dcm", ".dicom", ".geojson"}
SPLIT_FOLDERS = ("train", "val", "test")
# File names an export's standard gives, which readers recognise and which name no one.
STANDARD_NAMES = {"DICOMDIR"}


class MissingSiteKey(UserError, RuntimeError):
    """Ingestion has no site key to make pseudonyms with."""


class SiteKeyError(UserError, ValueError):
    """A site key or mapping that cannot be used as it is."""


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY).expanduser().absolute()


def mapping_path(key: Path) -> Path:
    return Path(os.environ.get(MAP_ENV) or key.parent / MAPPING).expanduser().absolute()


def new_key(path: Path) -> bool:
    """Write a new random site key at ``path`` (owner-only); False, writing nothing, when one is
    there: replacing it would give every patient a new pseudonym."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    return True


@dataclass
class Pseudonyms:
    """Keyed pseudonyms of one ingest, and what each stands for (saved for the steward)."""

    secret: bytes = field(repr=False)
    mapping: Path
    seen: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # pseudonym -> (kind, original)

    @classmethod
    def load(cls, away_from: tuple[Path, ...] = ()) -> Pseudonyms:
        """The site's pseudonyms; refused when the key is missing or malformed, or when it or the
        mapping lies inside one of ``away_from`` (the raw folder, the dataset), where it would
        travel with the data."""
        path = key_path()
        if not path.is_file():
            raise MissingSiteKey(f"no site key at {path} ({KEY_ENV}): create one with `python -m data.privacy new-key`, "
                                 "kept outside the repository and every dataset, the same file on every machine that "
                                 "ingests (the same key gives a patient the same pseudonym)")
        text = path.read_text().strip()
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) < KEY_BYTES:
            raise SiteKeyError(f"{path}: expected a site key of {2 * KEY_BYTES} hex characters "
                               "(`python -m data.privacy new-key` writes one)")
        mapping = mapping_path(path)
        for folder in away_from:
            folder = folder.resolve()
            for name, held in (("site key", path.resolve()), ("pseudonym mapping", mapping.resolve())):
                if held == folder or folder in held.parents:
                    raise SiteKeyError(f"{held}: the {name} lies inside {folder}, and would travel with the data; "
                                       f"keep it outside ({KEY_ENV}, {MAP_ENV})")
        return cls(secret, mapping)

    def of(self, kind: str, value: str) -> str:
        digest = hmac.new(self.secret, f"{kind}\0{value}".encode(), sha256).hexdigest()[:16]
        token = f"{PREFIXES[kind]}-{digest}"
        self.seen[token] = (kind, value)
        return token

    def name(self, part: str, is_file: bool) -> str:
        """One path component's pseudonym; a hidden one stays hidden, a file keeps a known ending."""
        if is_file and part.upper() in STANDARD_NAMES:
            return part
        hidden = "." if part.startswith(".") else ""
        suffix = Path(part).suffix
        if is_file and suffix.lower() in KEPT_SUFFIXES and Path(part).stem:
            return hidden + self.of("file", part[: -len(suffix)]) + suffix
        return hidden + self.of("file" if is_file else "folder", part)

    def path(self, relative: Path, clear: int) -> Path:
        """``relative`` with all but its first ``clear`` components pseudonymised."""
        parts = relative.parts
        named = [*parts[:clear], *(self.name(p, i == len(parts) - 1) for i, p in enumerate(parts) if i >= clear)]
        result = Path(*named)
        self.seen[result.as_posix()] = ("path", relative.as_posix())
        return result

    def save(self) -> Path:
        """Append what this ingest named to the steward's mapping (once per pseudonym), under a
        lock: ingests running at once on one site each add theirs."""
        self.mapping.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only, as the key: it names every patient.
        descriptor = os.open(self.mapping, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a+", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            known = {row[0] for row in csv.reader(f) if row}
            new = [(token, kind, value) for token, (kind, value) in self.seen.items() if token not in known]
            if not known:
                new.insert(0, ("pseudonym", "kind", "original"))
            csv.writer(f).writerows(new)
            f.flush()
            os.fsync(f.fileno())
        return self.mapping


def pseudonymous_folder(out: Path) -> Path:
    """Beside the dataset at ``out``: its ingestion's views and their locks (links and pseudonyms
    only; the views are removed when ingestion ends)."""
    return out.with_name(f".{out.name}.pseudonymous")


@contextlib.contextmanager
def pseudonymous_view(raw: Path, names: Pseudonyms, clear: Callable[[tuple[str, ...]], int], at: Path) -> Iterator[Path]:
    """A folder of links at ``at`` holding every file of ``raw`` under pseudonymised names;
    ``clear(parts)`` says how many leading components of a file's relative path keep their names
    (a split, a declared class). The same place every time, so that what is remembered of an
    input by its path (its md5) is found again; held under a lock, so that two ingests of one
    dataset take turns; removed on leaving."""
    raw = raw.resolve()
    if not raw.is_dir():
        raise IngestError(raw, "raw data directory not found")
    at.parent.mkdir(parents=True, exist_ok=True)
    with open(at.with_name(at.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(at, ignore_errors=True)  # what a killed ingest left
        view = at.resolve()
        try:
            for path in sorted(raw.rglob("*")):
                if path.is_dir():
                    continue
                relative = path.relative_to(raw)
                target = view / names.path(relative, clear(relative.parts))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
            view.mkdir(parents=True, exist_ok=True)
            token = VIEWS.set({**(VIEWS.get() or {}), view: raw})
            try:
                yield view
            finally:
                VIEWS.reset(token)
        finally:
            shutil.rmtree(view, ignore_errors=True)


def clear_parts(modality: str, labels: tuple[str, ...], raw: Path) -> Callable[[tuple[str, ...]], int]:
    """Which leading folders keep their names: an image folder's split and class folders (the
    classes are the dataset), a CT export's top folder when it is one of the declared ``labels``;
    slides keep none (their top folder is the case)."""
    if modality in ("rgb", "gray"):
        has_splits = raw.is_dir() and any(p.is_dir() and p.name in SPLIT_FOLDERS for p in raw.iterdir())

        def image_folder(parts: tuple[str, ...]) -> int:
            split = 1 if has_splits and parts[0] in SPLIT_FOLDERS else 0
            return min(split + 1, len(parts) - 1)
        return image_folder
    if modality == "ct":
        return lambda parts: 1 if len(parts) > 1 and parts[0] in labels else 0
    return lambda parts: 0


def reveal(tokens: list[str], mapping: Path) -> dict[str, tuple[str, str]]:
    """What each pseudonym stands for, from the steward's mapping."""
    if not mapping.is_file():
        raise SiteKeyError(f"{mapping}: no pseudonym mapping here (written beside the site key by each ingest)")
    wanted = set(tokens)
    with open(mapping, newline="") as f:
        return {row["pseudonym"]: (row["kind"], row["original"]) for row in csv.DictReader(f) if row["pseudonym"] in wanted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The site key of ingestion's pseudonyms, and the mapping back")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help=f"write a site key at ${KEY_ENV} (default {DEFAULT_KEY}) unless one is there")
    shown = commands.add_parser("reveal", help="what pseudonyms stand for (the data steward's mapping)")
    shown.add_argument("pseudonyms", nargs="+")
    args = parser.parse_args(argv)

    def run() -> None:
        path = key_path()
        if args.command == "new-key":
            if new_key(path):
                print(f"site key written to {path} (owner-only); keep it outside the repository and every dataset, "
                      f"and copy it to every machine that ingests ({KEY_ENV} names its path)")
            else:
                print(f"site key kept: {path} exists (a new key would give every patient a new pseudonym)")
            return
        found = reveal(args.pseudonyms, mapping_path(path))
        for token in args.pseudonyms:
            kind, original = found.get(token, ("?", "(not in the mapping)"))
            print(f"{token}\t{kind}\t{original}")

    return run_command("privacy", run)


if __name__ == "__main__":
    sys.exit(main())
