"""Building a dataset beside its destination and publishing it whole: a staging folder that refuses
any output two inputs would both write, each unit's outputs as files or as its own shards, units
run in worker processes and adopted or discarded whole, and the swap that replaces the old
dataset only when the new one is complete."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
from PIL import Image

from data.inputs import REFUSED, SKIPPED, SUMMARY, IngestError, Skipped, output_stem
from data.listing import IngestErrors, IngestFailed, NothingToIngest, Partial, dropped_whole, listing
from data.metadata import MANIFEST
from data.parallel import units_mapper
from data.shards import SHARDS, Md5Memo, Sample, ShardWriter, inputs_memo, png_bytes
from dinomx.errors import UserError
from dinomx.shards import INDEX, Shard, ShardSet, read_index

log = logging.getLogger(__name__)


class Staging:
    """The folder a dataset is built in, refusing loudly any output two inputs would both write."""

    def __init__(self, root: Path):
        self.root, self.writers = root, {}

    def save(self, image: Image.Image, relative: str, source: str, row: dict | None = None) -> None:
        """``row``: the image's manifest row (the manifest is written from what units return)."""
        _claim(self.writers, relative, source)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)

    def adopt(self, written: dict[str, str]) -> None:
        """Take in the outputs one unit wrote (in this process or another). One that another unit
        wrote too was overwritten: a naming fault no input can fix or quarantine, so the whole
        dataset is refused."""
        collisions = [IngestError(source, f"its output {relative} is also the output of {self.writers[relative]}; "
                                          "nothing would tell them apart")
                      for relative, source in written.items() if self.writers.get(relative, source) != source]
        if collisions:
            raise IngestFailed(collisions)
        self.writers.update(written)

    def discard(self, written: dict[str, str]) -> None:
        """Remove what a unit that failed halfway wrote: it leaves nothing."""
        for relative in written:
            (self.root / relative).unlink(missing_ok=True)
            del self.writers[relative]


def _claim(writers: dict[str, str], relative: str, source: str) -> None:
    if relative in writers:
        raise IngestError(source, f"its output {relative} is also the output of {writers[relative]}; "
                                  "nothing would tell them apart")
    writers[relative] = source


@dataclass(frozen=True)
class ShardLayout:
    """A dataset written as shards (``data.shards``) instead of one file per image."""
    max_bytes: int
    image: str  # the component that trains: the highest magnification, or the slice
    components: tuple[str, ...]  # every image component of a sample


def _place(relative: str) -> tuple[str, str, str, str]:
    """(split, label, sample key, component) of an output named as the folder layout names it
    (``[<prefix>/]<split>/<label>/<name>.png``): the magnifications and the mask of one place on
    a slide are one sample."""
    *prefix, split, label, name = relative.split("/")
    folder = "/".join(prefix)
    component = {"masks": "mask.png", "slices": "png", "": "png"}.get(folder, f"{folder}.png")
    return split, label, name.rsplit(".", 1)[0].replace(".", "_"), component


class ShardStaging:
    """One unit's outputs as its own shards under ``<staging>/shards/<split>/``: consecutive
    saves of one place make one sample."""

    def __init__(self, root: Path, layout: ShardLayout, stem: str, unit: str, source: str):
        self.root, self.layout, self.stem, self.unit, self.source = root, layout, stem, unit, source
        self.outputs: dict[str, str] = {}  # every image's folder-layout name: two inputs never share one
        self.splits: dict[str, ShardWriter] = {}
        self.sample: Sample | None = None

    def save(self, image: Image.Image, relative: str, source: str, row: dict | None = None) -> None:
        _claim(self.outputs, relative, source)
        split, label, key, component = _place(relative)
        if self.sample is None or self.sample.key != key:
            self._flush()
            self.sample = Sample(key, split, label)
        self.sample.images[component] = png_bytes(image)
        if row is not None:
            self.sample.rows[component] = {k: v for k, v in row.items() if k != "path"}

    def _flush(self) -> None:
        if self.sample is None:
            return
        sample, self.sample = self.sample, None
        writer = self.splits.get(sample.split) or self.splits.setdefault(sample.split, ShardWriter(
            self.root / SHARDS / sample.split, self.stem, self.layout.max_bytes, self.unit, self.source))
        writer.add(sample.key, sample.parts(), sample.label, images=len(sample.rows))

    def close(self) -> list[tuple[str, Shard]]:
        self._flush()
        return [(split, shard) for split, writer in self.splits.items() for shard in writer.close()]

    @property
    def writers(self) -> dict[str, str]:
        """The shard files written (or being written), relative to the staging root."""
        return {f"{SHARDS}/{split}/{name}": self.source for split, writer in self.splits.items()
                for name in writer.files()}


def _run_unit(rows_of: Callable, name_of: Callable, staging: Path, raw: Path, layout: ShardLayout | None,
              task: tuple[str, object]) -> tuple[str, object, dict[str, str], list[tuple[str, str]]]:
    """One unit's rows (or, as shards, the shards it wrote), or why it gave none, as plain values
    (they may cross a process boundary), with the outputs it wrote and the inputs it was kept
    without. ``task``: (the unit's fingerprint, the unit)."""
    fingerprint, unit = task
    if layout is None:
        writer = Staging(staging)
    else:
        relative = Path(name_of(unit)).relative_to(raw).as_posix()
        writer = ShardStaging(staging, layout, output_stem(relative).replace(".", "_"), fingerprint, relative)
    try:
        rows = rows_of(unit, writer)
        aside = rows.set_aside if isinstance(rows, Partial) else []
        rows = rows.rows if isinstance(rows, Partial) else rows
        if layout is not None:
            # A unit kept without some inputs is read again next time (no fingerprint to reuse
            # its shards by), so that every ingest reports what it was kept without.
            rows = [(split, replace(shard, unit="") if aside else shard) for split, shard in writer.close()]
        return "rows", rows, writer.writers, [(e.path, e.problem) for e in aside]
    except Skipped as skip:
        return "skipped", (skip.path, skip.reason), writer.writers, []
    except IngestErrors as many:
        return "errors", [(e.path, e.problem) for e in many.errors], writer.writers, []
    except IngestError as exc:
        return "errors", [(exc.path, exc.problem)], writer.writers, []
    except Exception as exc:  # a reader's own failure on one file must not hide the others
        log.exception("%s: unexpected failure", name_of(unit))
        return "errors", [(str(name_of(unit)), f"could not be read ({type(exc).__name__}: {exc})")], writer.writers, []

@dataclass
class Units:
    """What a reader hands the publisher: its units (a slide, a CT series, an image), how each
    makes its rows, and which input files each stands for. ``rows_of(unit, staging)`` returns the
    unit's manifest rows (or a ``Partial``); with ``workers`` > 1 units run in that many
    processes, so ``rows_of`` and ``name_of`` must then pickle. ``fingerprint_of(memo, unit)``
    (its files' content, the options) lets an unchanged unit keep its shards."""

    items: list
    rows_of: Callable
    name_of: Callable = str
    files_of: Callable = lambda unit: [str(unit)]
    fingerprint_of: Callable | None = None
    workers: int = 1


@dataclass
class Found:
    """What listing the inputs found before any unit ran: how many inputs there are, those
    skipped and refused with their reasons, and warnings. ``members``: the number of files a
    source stands for (a DICOM slide's levels), so that inputs = used + skipped + quarantined
    counts files."""

    inputs: int
    skipped: list[Skipped]
    errors: list[IngestError]
    warnings: list[str] = field(default_factory=list)
    members: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """Where and how the dataset is written: ``extra`` files beside the manifest, a shard
    ``layout`` (None: one file per image), ``empty`` why units may give no image."""

    out: Path
    on_error: str = "refuse"
    val_fraction: float = 0.0
    layout: ShardLayout | None = None
    extra: dict[str, str] = field(default_factory=dict)
    empty: str = ""


@dataclass
class Built:
    """What running the units gave: their rows (or shards), the input files used, and the
    units kept without some of their inputs."""

    rows: list = field(default_factory=list)
    used: int = 0
    skipped_units: int = 0
    partial: list[dict] = field(default_factory=list)


def publish(raw: Path, units: Units, found: Found, target: Target) -> pd.DataFrame:
    """Run every unit (so that one run reports every bad file) and publish ``target.out`` whole:
    with ``on_error="refuse"`` nothing is published if any input was refused, with
    ``"quarantine"`` a failed unit (all of ``files_of(unit)``) is set aside and the rest
    published. What is skipped or set aside is listed with its reason beside the manifest.
    Returns the manifest, or the table of shards."""
    out = target.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in (REFUSED, SKIPPED):
        out.with_name(f"{out.name}.{name}").unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.ingest-", dir=out.parent))
    try:
        built = _run_units(raw, units, found, target, staging)
        _refuse_or_stop(raw, units, found, target, built)
        table, counts = _write_tables(raw, units, found, target, built, staging)
        _replace(out, staging)
        log.info("%s: %d input(s): %d used, %d skipped, %d quarantined; %d image file(s)%s", out, found.inputs,
                 counts["used"], len(found.skipped), len(found.errors), counts["images"],
                 f" in {len(table)} shard(s)" if target.layout else "")
        return table
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_units(raw: Path, units: Units, found: Found, target: Target, staging: Path) -> Built:
    """Every unit run (or, unchanged, its previous shards taken over), results in the units'
    order so that the manifest is the same however many workers ran them; what a failed unit
    wrote is removed, and its files refused with it."""
    writer, built = Staging(staging), Built()
    fingerprints = [""] * len(units.items)
    if target.layout and units.fingerprint_of:
        memo = Md5Memo(inputs_memo(target.out))
        fingerprints = [units.fingerprint_of(memo, u) for u in units.items]
        memo.save()
    kept = _previous_shards(target.out) if target.layout else {}
    fresh = [(f, u) for f, u in zip(fingerprints, units.items) if f not in kept]
    run = functools.partial(_run_unit, units.rows_of, units.name_of, staging, raw, target.layout)
    with units_mapper(units.workers, len(fresh)) as mapper:
        results = iter(mapper(run, fresh))
        for unit, fingerprint in zip(units.items, fingerprints):
            kind, payload, written, aside = _relink(target.out, staging, kept[fingerprint]) if fingerprint in kept \
                else next(results)
            writer.adopt(written)
            if kind == "rows":
                built.rows.extend(payload)
                built.used += len(units.files_of(unit)) - len(aside) if payload else 0
                if aside:
                    found.errors += [IngestError(*p) for p in aside]
                    built.partial.append({"unit": Path(units.name_of(unit)).relative_to(raw).as_posix(),
                                          "set_aside": [Path(path).relative_to(raw).as_posix() for path, _ in aside]})
                continue
            writer.discard(written)
            if kind == "skipped":
                found.skipped.append(Skipped(*payload))
                built.skipped_units += 1
            else:
                found.errors += dropped_whole(units.files_of(unit), [IngestError(*p) for p in payload])
    return built


def _refuse_or_stop(raw: Path, units: Units, found: Found, target: Target, built: Built) -> None:
    """Raise when nothing is to be published: an input refused (``refuse``), or no image at all
    (each input's reason listed beside where the dataset would be)."""
    refused, skipped = (target.out.with_name(f"{target.out.name}.{name}") for name in (REFUSED, SKIPPED))
    if found.errors and target.on_error == "refuse":
        listing(raw, found.errors).to_csv(refused, index=False)
        raise IngestFailed(found.errors, refused, found.inputs)
    if built.rows:
        return
    if found.errors:  # quarantine set everything aside: the reasons are the answer
        listing(raw, found.errors).to_csv(refused, index=False)
        raise IngestFailed(found.errors, refused, found.inputs, quarantined=True)
    if built.skipped_units == len(units.items):
        listing(raw, found.skipped).to_csv(skipped, index=False)
        raise NothingToIngest(raw, found.skipped, skipped)
    raise IngestError(raw, f"no images produced from {len(units.items)} input(s){target.empty}")


def _write_tables(raw: Path, units: Units, found: Found, target: Target, built: Built,
                  staging: Path) -> tuple[pd.DataFrame, dict]:
    """The manifest (or the shard indexes), the listings of what was skipped and set aside, and
    ``ingest.json``: the counts (inputs = used + skipped + quarantined) and the warnings."""
    if target.layout is None:
        table = pd.DataFrame(built.rows)
        table.to_csv(staging / MANIFEST, index=False)
        splits, images = set(table["split"]), len(table)
        used = sum(found.members.get(source, 1) for source in table["source"].unique())
    else:
        table = _write_indexes(staging, built.rows, target.layout)
        splits, images, used = set(table["split"]), int(table["images"].sum()), built.used
    listing(raw, found.skipped).to_csv(staging / SKIPPED, index=False)
    listing(raw, found.errors).to_csv(staging / REFUSED, index=False)
    warnings = found.warnings + [f"split {split!r} is empty" for split in ("train", "val")
                                 if (split == "train" or target.val_fraction > 0) and split not in splits]
    warnings += [f"{p['unit']}: its series kept without {len(p['set_aside'])} unreadable slice(s) "
                 f"({', '.join(p['set_aside'][:3])}{', ...' if len(p['set_aside']) > 3 else ''}): it has gaps there"
                 for p in built.partial]
    if found.errors:
        warnings.append(f"{len(found.errors)} input(s) quarantined (--on-error quarantine), listed in {REFUSED}")
    for warning in warnings:
        log.warning("%s: %s", target.out, warning)
    counts = {"inputs": found.inputs, "used": used, "skipped": len(found.skipped), "quarantined": len(found.errors),
              "images": images}
    (staging / SUMMARY).write_text(json.dumps({**counts, **({"shards": len(table)} if target.layout else {}),
                                               **({"partial": built.partial} if built.partial else {}),
                                               "on_error": target.on_error, "warnings": warnings}, indent=2))
    for name, text in target.extra.items():
        (staging / name).write_text(text)
    return table, counts


def _replace(out: Path, staging: Path) -> None:
    """The staged dataset takes the place of the old one (a rename each: never half of either)."""
    previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def _previous_shards(out: Path) -> dict[str, list[tuple[str, Shard]]]:
    """The shards of the dataset at ``out`` by the fingerprint of the unit that wrote them."""
    by_unit: dict[str, list[tuple[str, Shard]]] = {}
    for index in sorted((out / SHARDS).glob(f"*/{INDEX}")):
        try:
            listed = read_index(index.parent)
        except UserError:
            continue  # an unreadable old index only costs tiling again
        for shard in listed.shards:
            if shard.unit and (index.parent / shard.name).is_file():
                by_unit.setdefault(shard.unit, []).append((index.parent.name, shard))
    return by_unit


def _relink(out: Path, staging: Path, shards: list[tuple[str, Shard]]) -> tuple[str, object, dict[str, str]]:
    """A unit's unchanged shards taken into the new dataset as the same files."""
    written = {}
    for split, shard in shards:
        relative = f"{SHARDS}/{split}/{shard.name}"
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(out / relative, staging / relative)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(out / relative, staging / relative)
        written[relative] = shard.source
    return "rows", shards, written, []


def _write_indexes(staging: Path, shards: list[tuple[str, Shard]], layout: ShardLayout) -> pd.DataFrame:
    """``shards/<split>/shards.json`` of each split; every split lists the classes of all, so
    that a validation split's labels index like the training split's."""
    classes = sorted({label for _, shard in shards for label in shard.labels})
    for split in sorted({split for split, _ in shards}):
        listed = [shard for s, shard in shards if s == split]
        index = ShardSet(".", listed, classes, layout.image, list(layout.components))
        (staging / SHARDS / split / INDEX).write_text(index.to_json())
    return pd.DataFrame([{"split": split, **asdict(shard)} for split, shard in shards])


def fingerprint(memo: Md5Memo, raw: Path, files: list[str | Path], *settings) -> str:
    """What a unit's shards depend on: the content of its files and the options that tile them."""
    contents = [[path.relative_to(raw).as_posix(), memo.md5(path)] for path in sorted(map(Path, files))]
    return hashlib.sha256(json.dumps([contents, [repr(s) for s in settings]]).encode()).hexdigest()[:32]
