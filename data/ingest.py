"""Turn raw slides, CT exports or plain image folders into a dataset the engine trains on, all or
nothing, without losing or merging an input.

``he``: whole-slide images (with optional ``<slide>.geojson`` annotations beside each slide) ->
``<out>/<mag>x/<split>/<label>/<name>_x<X>_y<Y>.png`` for every requested magnification (same
file name = same place on the slide), ``<out>/masks/...`` (class-index masks of the grid tiles)
when there are annotations. Splits are per case (``--cases`` CSV, else the top folder).

``ct``: DICOM files (``<raw>/<label>/...`` or flat), grouped into series and ordered by position ->
``<out>/slices/<split>/<label>/<name>_f<frame>.png``: one window as a grey slice, or three
channels (adjacent slices, or three windows) for an RGB backbone. Splits are per patient.

``rgb`` / ``gray``: any folder of images (``<raw>/[<split>/]<class>/<image>``) ->
``<out>/<split>/<label>/<name>.png`` as 8-bit RGB or greyscale (16-bit and float images scaled by
their range, never clipped).

With ``shard_mb`` (the command line's default for ``he`` and ``ct``) the same images go into
shards instead, ``<out>/shards/<split>/<slide or series>-00000.tar`` with an index per split
(``data.shards``, ``dinomx.shards``): one sample per place holding its magnifications, its mask and
its metadata rows. A slide or series whose files and options did not change keeps its shards.

Output names come from the whole relative path of their input (``data.inputs.output_stem``), so
two inputs never share one. Each run writes ``manifest.csv`` (one row per image file, with the
statistics the validation suites check), ``skipped.csv`` (inputs that are not images of the
dataset, hidden files among them, with the reason) and ``ingest.json`` (inputs = used + skipped +
quarantined). Everything is written to a staging folder first.

What happens to an input that should be an image and cannot be read is ``on_error``'s choice:
``refuse`` (the default) publishes nothing, leaves ``<out>`` as it was and lists every refused
file with its own reason in ``<out>.refused.csv`` beside it; ``quarantine`` sets those inputs
aside (listed in ``<out>/refused.csv``, counted in ``ingest.json``) and builds the dataset from
the rest. A CT series that loses a slice is refused whole; under ``quarantine`` it keeps its
readable slices, each row saying how many are missing just before it (2.5D, whose slices need
their neighbours, drops it whole).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pydicom
from PIL import Image

from data.annotations import ANNOTATIONS, BACKGROUND, annotation_record, majority_label, read_regions, tile_mask
from data.dicom import CTFrame, CTSlice, describe, read_ct, window
from data.inputs import (
    CHANNELS,
    NOT_IMAGES,
    REFUSED,
    SKIPPED,
    SUMMARY,
    IngestError,
    Skipped,
    output_stem,
    within,
)
from data.metadata import BLANK_STD, MANIFEST
from data.parallel import units_mapper
from data.params import MODALITIES, ON_ERROR, IngestParams
from data.shards import SHARDS, Md5Memo, Sample, ShardWriter, inputs_memo, png_bytes
from data.tiling import TILING, series_record, slide_record
from data.wsi import SLIDE_SUFFIXES, WHOLE_SLIDE_IMAGE, TilePlan, open_slide, tile_slide
from dinomx.errors import DataError, UserError, run_command
from dinomx.images import IMAGE_SUFFIXES, UNREADABLE, image_problem, stain_means, to_model_mode
from dinomx.shards import INDEX, Shard, ShardSet, read_index

log = logging.getLogger(__name__)
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


def stain_statistics(tile: Image.Image) -> dict:
    """Mean haematoxylin and eosin of an RGB tile, by the engine's HED transform (the one its stain
    augmentation jitters), from per-channel histograms."""
    hematoxylin, eosin = stain_means(np.asarray(tile.convert("RGB")))
    return {"hematoxylin_mean": hematoxylin, "eosin_mean": eosin}


class _Staging:
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


class _ShardStaging:
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
        writer = _Staging(staging)
    else:
        relative = Path(name_of(unit)).relative_to(raw).as_posix()
        writer = _ShardStaging(staging, layout, output_stem(relative).replace(".", "_"), fingerprint, relative)
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


# -- whole-slide images ----------------------------------------------------------------------------
def case_ids(raw: Path, slides: list[Path], cases_csv: str | Path | None) -> dict[Path, str]:
    """The case (patient) of each slide, the unit of the train/val split: from a CSV with columns
    ``slide`` (path relative to the raw folder) and ``case``, else the slide's top folder
    (``<raw>/<case>/<slide>``), else the slide itself."""
    if cases_csv is None:
        return {s: (s.relative_to(raw).parts[0] if len(s.relative_to(raw).parts) > 1 else s.relative_to(raw).as_posix())
                for s in slides}
    try:
        table = pd.read_csv(cases_csv, dtype=str)
    except (OSError, ValueError) as exc:
        raise IngestError(cases_csv, f"not a readable CSV ({exc})") from None
    if not {"slide", "case"} <= set(table.columns):
        raise IngestError(cases_csv, f"expected columns 'slide' and 'case', found {list(table.columns)}")
    mapping = dict(zip(table["slide"], table["case"]))
    missing = [s.relative_to(raw).as_posix() for s in slides if s.relative_to(raw).as_posix() not in mapping]
    if missing:
        raise IngestError(cases_csv, f"no case for {len(missing)} slide(s), e.g. {missing[0]}: every slide needs one, "
                                     "or its blocks could land in both train and val")
    return {s: str(mapping[s.relative_to(raw).as_posix()]) for s in slides}


def _slide_rows(raw: Path, plan: TilePlan, annotations: dict, classes: list[str], case_of: dict[Path, str],
                splits: dict[Path, str], slide_path: Path, staging: _Staging) -> list[dict]:
    """Module-level and given plain values, so that slides can be tiled in worker processes."""
    relative = slide_path.relative_to(raw).as_posix()
    regions, split, case = annotations.get(slide_path), splits[slide_path], case_of[slide_path]
    stem = output_stem(relative)
    rows = []
    slide, info = open_slide(slide_path)
    try:
        for tile in tile_slide(slide, info, plan):
            label, mask = UNLABELLED, None
            if regions is not None:
                mask = tile_mask(regions, classes, tile.x, tile.y, tile.size, plan.tile_size)
                label = majority_label(mask, classes)
            folder = f"{split}/{label}/{stem}_x{tile.x}_y{tile.y}.png"
            if mask is not None:
                staging.save(Image.fromarray(mask), f"masks/{folder}", relative)
            # Once per tile, on the grid tile (the region whose tissue was measured): the stain of
            # one place does not change with the magnification it is seen at.
            stains = stain_statistics(tile.images[plan.magnifications[0]])
            for mag, image in tile.images.items():
                rows.append({
                    "path": f"{mag:g}x/{folder}", "modality": "he", "source": relative, "case": case, "split": split,
                    "label": label, "magnification": mag,
                    "mpp": info.mpp * info.objective_power / mag if info.mpp else None,
                    "objective_power": info.objective_power, "x": tile.x, "y": tile.y,
                    "level0_size": tile.size, "tissue_fraction": tile.tissue_fraction,
                    "mask": f"masks/{folder}" if mask is not None else None,
                    **stains,
                })
                staging.save(image, rows[-1]["path"], relative, rows[-1])
    except openslide.OpenSlideError as exc:
        raise IngestError(slide_path, f"slide data is corrupt or truncated ({exc})") from None
    finally:
        slide.close()
    log.info("%s: %d tiles at %s (scanned at %gx)", relative, len(rows) // len(plan.magnifications),
             "/".join(f"{m:g}x" for m in plan.magnifications), info.objective_power)
    return rows


# -- CT --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesFilter:
    """Which CT series to keep; the others are skipped with the reason."""
    thickness: tuple[float, float] | None = None  # mm, inclusive
    kernels: tuple[str, ...] = ()  # ConvolutionKernel values, case-insensitive

    def refusal(self, first: CTSlice) -> str | None:
        if self.thickness is not None:
            low, high = self.thickness
            if first.slice_thickness is None or not low <= first.slice_thickness <= high:
                return f"slice thickness {first.slice_thickness} mm outside the selected {low:g}-{high:g} mm"
        if self.kernels and first.kernel.lower() not in {k.lower() for k in self.kernels}:
            return f"kernel {first.kernel or '(none)'} not among the selected {', '.join(self.kernels)}"
        return None


@dataclass(frozen=True)
class CTPlan:
    """How CT slices are written: one window as a grey slice, or three channels for an RGB
    backbone, from adjacent slices (``2.5d``, one window) or from three windows of one slice."""
    window: tuple[float, float] = (40.0, 400.0)  # center, width (HU)
    channels: str = "single"
    windows: tuple[tuple[float, float], ...] = ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0))
    select: SeriesFilter = SeriesFilter()

    def __post_init__(self):
        if self.channels not in CHANNELS:
            raise DataError(f"channels: expected one of {list(CHANNELS)}, got {self.channels!r}")
        if self.channels == "windows" and len(self.windows) != 3:
            raise DataError(f"windows: three (center, width) pairs make the three channels, got {len(self.windows)}")
        if any(w <= 0 for _, w in (self.window, *self.windows)):
            raise DataError("window width must be positive")


def slice_image(plan: CTPlan, hu: np.ndarray, before: np.ndarray | None = None, after: np.ndarray | None = None) -> Image.Image:
    """Slice ``hu`` as the plan writes it: grey through its window, or three channels (``before``,
    ``hu``, ``after`` for 2.5D; three windows of ``hu``). Inference cuts a new series with it too."""
    if plan.channels == "single":
        return Image.fromarray(window(hu, *plan.window))
    if plan.channels == "2.5d":
        return Image.fromarray(np.stack([window(f, *plan.window) for f in (before, hu, after)], -1))
    return Image.fromarray(np.stack([window(hu, c, w) for c, w in plan.windows], -1))


def _close(a, b, tolerance: float) -> bool:
    return (a is None) == (b is None) and (a is None or np.allclose(a, b, atol=tolerance))


def order_series(slices: list[CTSlice], plan: CTPlan) -> list[CTSlice]:
    """A series' slices in anatomical order (position along the slice normal; instance numbers
    where positions are missing), refused when its slices do not belong together."""
    first = slices[0]
    for other in slices[1:]:
        for name, a, b, tolerance in (("size", (first.rows, first.columns), (other.rows, other.columns), 0),
                                      ("pixel spacing", first.pixel_spacing, other.pixel_spacing, 1e-3),
                                      ("orientation", first.orientation, other.orientation, 1e-3),
                                      ("slice thickness", first.slice_thickness, other.slice_thickness, 1e-3)):
            if not _close(a, b, tolerance):
                raise IngestError(other.path, f"series {first.series_uid}: {name} {b} differs from {a} of {first.path}; "
                                              "its slices do not make one volume")
    positions = [s.along_normal for s in slices]
    if None in positions:
        return sorted(slices, key=lambda s: (s.instance, s.path, s.frame))
    ordered = sorted(slices, key=lambda s: (s.along_normal, s.path, s.frame))
    steps = np.diff([s.along_normal for s in ordered])
    if len(steps) and np.min(np.abs(steps)) < 1e-3:
        duplicate = ordered[int(np.argmin(np.abs(steps))) + 1]
        raise IngestError(duplicate.path, f"series {first.series_uid}: two slices at position {duplicate.along_normal:g} mm "
                                          "(a duplicate, or two series under one UID)")
    if plan.channels == "2.5d" and (gap := series_gap(ordered)):
        raise IngestError(gap[0].path, f"series {first.series_uid}: {gap[1]}; 2.5D stacking needs evenly spaced slices")
    return ordered


def series_gap(ordered: list[CTSlice]) -> tuple[CTSlice, str] | None:
    """The slice after the widest step of an ordered series, when that step is over 1.5 times the
    median spacing (a slice missing from the export), and what it is."""
    positions = [s.along_normal for s in ordered]
    if None in positions or len(positions) < 3:
        return None
    steps = np.diff(positions)
    if np.max(steps) <= 1.5 * np.median(steps):
        return None
    after = ordered[int(np.argmax(steps)) + 1]
    return after, f"a gap of {np.max(steps):g} mm before {Path(after.path).name} (median spacing {np.median(steps):g} mm)"


def _series_rows(series: list[CTSlice], raw: Path, staging: _Staging, plan: CTPlan, val_fraction: float,
                 seed: int, partial: bool) -> list[dict] | Partial:
    """The rows of a series' slices. An unreadable slice refuses the series whole, or with
    ``partial`` (quarantine, one slice per image) leaves a series kept without it; each row says
    how many slices are missing just before it. 2.5D needs every slice's neighbours: never partial."""
    cache: dict[str, list[CTFrame]] = {}
    failed: dict[str, IngestError] = {}

    def frame(index: int) -> CTFrame:
        info = series[min(max(index, 0), len(series) - 1)]  # the edges repeat their own slice
        if info.path in failed:
            raise failed[info.path]
        if info.path not in cache:
            if len(cache) > 3:
                cache.pop(next(iter(cache)))
            try:
                cache[info.path] = read_ct(info.path)
            except IngestError as exc:
                failed[info.path] = exc
                raise
        return cache[info.path][info.frame]

    partial = partial and plan.channels != "2.5d"
    rows, missing_before = [], 0
    for index, info in enumerate(series):
        try:
            current = frame(index)
            neighbours = [frame(i) for i in (index - 1, index + 1)] if plan.channels == "2.5d" else []
        except IngestError:
            missing_before += 1
            continue  # every slice is read, so that one run names every bad file of the series
        if failed and not partial:
            continue
        relative = Path(info.path).relative_to(raw)
        label = relative.parts[0] if len(relative.parts) > 1 else UNLABELLED
        split = split_of(info.patient_id or info.series_uid or relative.as_posix(), val_fraction, seed)
        image = slice_image(plan, current.hu, *(f.hu for f in neighbours))
        out = f"slices/{split}/{label}/{output_stem(relative)}_f{info.frame}.png"
        rows.append({
            "path": out, "modality": "ct", "source": relative.as_posix(), "split": split, "label": label,
            "frame": info.frame, "series_uid": info.series_uid, "series_index": index, "stacking": plan.channels,
            # Flat in the window (the air above a skull): kept, so the series stays whole for 2.5D
            # neighbours and readers; marked, so a sampler or a reviewer can leave it out.
            "blank": bool(np.asarray(image).std() < BLANK_STD),
            "hu_min": float(current.hu.min()), "hu_max": float(current.hu.max()), "hu_mean": float(current.hu.mean()),
            "padding_fraction": current.padding_fraction, "below_air_fraction": current.below_air_fraction,
            "above_ceiling_fraction": current.above_ceiling_fraction,
            "pixel_spacing_row": info.pixel_spacing[0] if info.pixel_spacing else None,
            "pixel_spacing_col": info.pixel_spacing[1] if info.pixel_spacing else None,
            "slice_thickness": info.slice_thickness, "kernel": info.kernel,
            "window_center": plan.window[0], "window_width": plan.window[1],
            "patient_id": info.patient_id, "slices_missing_before": missing_before,
        })
        missing_before = 0
        staging.save(image, out, relative.as_posix(), rows[-1])
    if failed and partial and rows:
        log.warning("series %s: %d slice(s), kept without %d unreadable one(s)", series[0].series_uid or series[0].path,
                    len(rows), len(failed))
        return Partial(rows, list(failed.values()))
    if failed:
        whole = "; 2.5D stacking needs every slice's neighbours, so the series is dropped whole" \
            if plan.channels == "2.5d" else ""
        raise IngestErrors([IngestError(e.path, e.problem + whole) for e in failed.values()])
    log.info("series %s: %d slice(s)", series[0].series_uid or series[0].path, len(rows))
    return rows


# -- all or nothing --------------------------------------------------------------------------------
def _listing(raw: Path, entries: list[Skipped | IngestError]) -> pd.DataFrame:
    def relative(path: str) -> str:
        try:
            return Path(path).relative_to(raw).as_posix()
        except ValueError:
            return path
    return pd.DataFrame([{"source": relative(e.path), "reason": getattr(e, "reason", None) or e.problem} for e in entries],
                        columns=["source", "reason"])


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise DataError(f"on_error: expected one of {list(ON_ERROR)}, got {on_error!r}")


def dropped_whole(files: list[str], errors: list[IngestError]) -> list[IngestError]:
    """``errors`` of some of a unit's ``files`` (a series, a slide's levels or annotations), and
    the rest of them refused with it: a unit is used whole or not at all."""
    failed = {e.path for e in errors}
    first = errors[0]
    return errors + [IngestError(f, f"goes with {Path(first.path).name}, refused: {first.problem}")
                     for f in sorted(set(files) - failed)]


def _publish(raw: Path, out: Path, inputs: int, units: list, rows_of: Callable, name_of: Callable,
             errors: list[IngestError], skipped: list[Skipped], extra: dict[str, str] | None = None,
             val_fraction: float = 0.0, members: dict[str, int] | None = None, on_error: str = "refuse",
             files_of: Callable = lambda unit: [str(unit)], warnings: list[str] | None = None,
             workers: int = 1, layout: ShardLayout | None = None,
             fingerprint_of: Callable | None = None, empty: str = "") -> pd.DataFrame:
    """Run ``rows_of(unit, staging)`` for every unit (a slide, a CT series) and publish ``out``.
    Every unit is tried, so one run reports every bad file; with ``on_error="refuse"`` nothing is
    published if any input was refused, with ``"quarantine"`` a failed unit (all of
    ``files_of(unit)``) is set aside and the rest published. What is skipped or set aside is
    listed with its reason beside the manifest. ``members``: the number of files a source stands
    for (a DICOM slide's levels), so that inputs = used + skipped + quarantined counts files.
    ``workers`` > 1 runs the units in that many processes (``rows_of`` and ``name_of`` must then
    pickle); results are taken in the units' order, so the manifest is the same either way.

    With a shard ``layout`` each unit writes its own shards, and a unit whose
    ``fingerprint_of(memo, unit)`` (its files' content, the options) matches shards of the
    previous ``out`` keeps them as they are (hard links: same bytes, same file) instead of being
    tiled again. ``empty`` says why units may give no image. Returns the manifest, or the table of
    shards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    refused_listing, skipped_listing = (out.with_name(f"{out.name}.{name}") for name in (REFUSED, SKIPPED))
    refused_listing.unlink(missing_ok=True)
    skipped_listing.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.ingest-", dir=out.parent))
    try:
        writer, rows, shards, used, skipped_units, partial = _Staging(staging), [], [], 0, 0, []
        fingerprints = [""] * len(units)
        if layout and fingerprint_of:
            memo = Md5Memo(inputs_memo(out))
            fingerprints = [fingerprint_of(memo, u) for u in units]
            memo.save()
        kept = _previous_shards(out) if layout else {}
        fresh = [(f, u) for f, u in zip(fingerprints, units) if f not in kept]
        run = functools.partial(_run_unit, rows_of, name_of, staging, raw, layout)
        with units_mapper(workers, len(fresh)) as mapper:
            results = iter(mapper(run, fresh))
            for unit, fingerprint in zip(units, fingerprints):
                kind, payload, written, aside = (_relink(out, staging, kept[fingerprint]) if fingerprint in kept
                                                 else next(results))
                writer.adopt(written)
                if kind == "rows":
                    (rows if layout is None else shards).extend(payload)
                    used += len(files_of(unit)) - len(aside) if payload else 0
                    if aside:
                        errors += [IngestError(*p) for p in aside]
                        partial.append({"unit": Path(name_of(unit)).relative_to(raw).as_posix(),
                                        "set_aside": [Path(path).relative_to(raw).as_posix() for path, _ in aside]})
                    continue
                writer.discard(written)
                if kind == "skipped":
                    skipped.append(Skipped(*payload))
                    skipped_units += 1
                else:
                    errors += dropped_whole(files_of(unit), [IngestError(*p) for p in payload])
        if errors and on_error == "refuse":
            _listing(raw, errors).to_csv(refused_listing, index=False)
            raise IngestFailed(errors, refused_listing, inputs)
        if not rows and not shards:
            if errors:  # quarantine set everything aside: the reasons are the answer
                _listing(raw, errors).to_csv(refused_listing, index=False)
                raise IngestFailed(errors, refused_listing, inputs, quarantined=True)
            if skipped_units == len(units):
                _listing(raw, skipped).to_csv(skipped_listing, index=False)
                raise NothingToIngest(raw, skipped, skipped_listing)
            raise IngestError(raw, f"no images produced from {len(units)} input(s){empty}")
        if layout is None:
            table = pd.DataFrame(rows)
            table.to_csv(staging / MANIFEST, index=False)
            splits, images = set(table["split"]), len(table)
            used = sum((members or {}).get(source, 1) for source in table["source"].unique())
        else:
            table = _write_indexes(staging, shards, layout)
            splits, images = set(table["split"]), int(table["images"].sum())
        _listing(raw, skipped).to_csv(staging / SKIPPED, index=False)
        _listing(raw, errors).to_csv(staging / REFUSED, index=False)
        warnings = list(warnings or []) + [f"split {split!r} is empty" for split in ("train", "val")
                                           if (split == "train" or val_fraction > 0) and split not in splits]
        warnings += [f"{p['unit']}: its series kept without {len(p['set_aside'])} unreadable slice(s) "
                     f"({', '.join(p['set_aside'][:3])}{', ...' if len(p['set_aside']) > 3 else ''}): it has gaps there"
                     for p in partial]
        if errors:
            warnings.append(f"{len(errors)} input(s) quarantined (--on-error quarantine), listed in {REFUSED}")
        for warning in warnings:
            log.warning("%s: %s", out, warning)
        (staging / SUMMARY).write_text(json.dumps({"inputs": inputs, "used": used, "skipped": len(skipped),
                                                   "quarantined": len(errors), "images": images,
                                                   **({"shards": len(table)} if layout else {}),
                                                   **({"partial": partial} if partial else {}),
                                                   "on_error": on_error, "warnings": warnings}, indent=2))
        for name, text in (extra or {}).items():
            (staging / name).write_text(text)
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        if out.exists():
            out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
        log.info("%s: %d input(s): %d used, %d skipped, %d quarantined; %d image file(s)%s", out, inputs, used,
                 len(skipped), len(errors), images, f" in {len(table)} shard(s)" if layout else "")
        return table
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _fingerprint(memo: Md5Memo, raw: Path, files: list[str | Path], *settings) -> str:
    """What a unit's shards depend on: the content of its files and the options that tile them."""
    contents = [[path.relative_to(raw).as_posix(), memo.md5(path)] for path in sorted(map(Path, files))]
    return hashlib.sha256(json.dumps([contents, [repr(s) for s in settings]]).encode()).hexdigest()[:32]





def _resolve(raw: str | Path, out: str | Path) -> tuple[Path, Path]:
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise IngestError(out, f"output must not overlap the raw data directory {raw}")
    return raw, out


def _sort_out(files: list[Path], wanted: Callable[[Path], bool], kind: str) -> tuple[list[Path], list[Skipped]]:
    """Files of the modality, and the rest skipped by their ending."""
    kept, skipped = [], []
    for path in files:
        if wanted(path):
            kept.append(path)
        else:
            skipped.append(Skipped(path, f"not a {kind} file ({path.suffix or 'no extension'})"))
    return kept, skipped


def _is_slide(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES


def dicom_slides(files: list[Path]) -> tuple[list[Path], dict[Path, list[Path]], list[Skipped], list[IngestError]]:
    """DICOM whole-slide images among ``files``: one slide per series in a folder (its levels and
    associated images are separate files), opened through its largest VOLUME image, which is
    how OpenSlide finds the rest. Returns (slides, files of each slide, skipped, refused)."""
    series, skipped, errors = {}, [], []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # parsers fail in format-specific ways
            errors.append(IngestError(path, f"DICOM file truncated or corrupt ({type(exc).__name__}: {exc})"))
            continue
        if str(ds.get("SOPClassUID", "")) != WHOLE_SLIDE_IMAGE:
            skipped.append(Skipped(path, f"DICOM, but not a whole-slide image (SOP Class {ds.get('SOPClassUID')})"))
            continue
        volume = "VOLUME" in [str(v).upper() for v in ds.get("ImageType", [])]
        size = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
        series.setdefault((path.parent, str(ds.get("SeriesInstanceUID", path))), []).append((volume, size, path))
    slides, members = [], {}
    for parts in series.values():
        volumes = sorted((size, path) for volume, size, path in parts if volume)
        if not volumes:
            skipped += [Skipped(path, "DICOM slide series without a VOLUME image") for _, _, path in parts]
            continue
        slides.append(volumes[-1][1])
        members[volumes[-1][1]] = sorted(path for _, _, path in parts)
    return slides, members, skipped, errors


def ingest_he(raw: str | Path, out: str | Path, plan: TilePlan, val_fraction: float = 0.2, seed: int = 0,
              cases: str | Path | None = None, lenient_annotations: bool = False,
              on_error: str = "refuse", workers: int = 0, shard_mb: int = 0,
              annotations_dir: str | Path | None = None) -> pd.DataFrame:
    """Tiles of every slide under ``raw`` (DICOM whole-slide images too); splits per case
    (``case_ids``). With ``lenient_annotations`` unclassified or non-polygon annotations are left
    out with a warning instead of refusing the slide. Slides are tiled ``workers`` at a time, one
    process each (0: one per core). ``shard_mb`` > 0 writes each slide as shards of up to that
    size, a sample per place holding every magnification (the highest trains).
    ``annotations_dir``: a slide's regions are ``<annotations_dir>/<slide path>.geojson`` (the same
    relative path, ``.geojson`` for the slide's ending) rather than a file beside the slide:
    corrected masks brought back from annotators (``data.dataset annotate``); who proposed them
    goes into ``annotations.json``."""
    _check_on_error(on_error)
    raw, out = _resolve(raw, out)
    if annotations_dir is not None and not Path(annotations_dir).is_dir():
        raise IngestError(annotations_dir, "annotations: not a folder (expected <slide path>.geojson files)")
    files, hidden = source_files(raw)
    slides, members, dicom_skipped, errors = dicom_slides([f for f in files if f.suffix.lower() == ".dcm"])
    others, not_slides = _sort_out([f for f in files if f.suffix.lower() not in (".geojson", ".dcm")], _is_slide, "slide")
    slides, skipped = sorted(slides + others), hidden + dicom_skipped + not_slides
    annotations, geojson_of = {}, {}
    stems = {s.with_suffix("") for s in slides}
    for geojson in (f for f in files if f.suffix.lower() == ".geojson"):
        if geojson.with_suffix("") not in stems:
            log.warning("%s: no slide of that name beside it (expected <slide name without extension>.geojson); not used",
                        geojson.relative_to(raw))
            skipped.append(Skipped(geojson, "annotation file whose name matches no slide"))
    for slide in list(slides):
        relative = slide.relative_to(raw).with_suffix(".geojson")
        geojson = within(annotations_dir, relative) if annotations_dir else within(raw, relative)
        if geojson.is_file():
            geojson_of[slide] = geojson
            try:
                annotations[slide] = read_regions(geojson, lenient=lenient_annotations)
            except IngestError as exc:
                # Its tiles would be labelled wrong: the slide goes with its annotations.
                errors += dropped_whole([str(slide), *map(str, members.get(slide, []))], [exc])
                slides.remove(slide)
    case_of = case_ids(raw, slides, cases)
    classes = sorted({r.name for regions in annotations.values() for r in regions})
    splits = {slide: split_of(case_of[slide], val_fraction, seed) for slide in slides}
    layout = None
    if shard_mb:
        components = [f"{m:g}x.png" for m in plan.magnifications] + (["mask.png"] if annotations else [])
        layout = ShardLayout(shard_mb << 20, f"{max(plan.magnifications):g}x.png", tuple(components))

    def files_of(slide: Path) -> list[str]:
        return [str(p) for p in members.get(slide, [slide])]

    def fingerprint(memo: Md5Memo, slide: Path) -> str:
        regions = memo.md5(geojson_of[slide]) if slide in annotations else None
        return _fingerprint(memo, raw, files_of(slide), plan, classes, case_of[slide], splits[slide], layout,
                            lenient_annotations, regions)

    return _publish(
        raw, out, len(files) + len(hidden), slides,
        functools.partial(_slide_rows, raw, plan, annotations, classes, case_of, splits),
        str, errors, skipped, val_fraction=val_fraction,
        extra={"classes.json": json.dumps([BACKGROUND, *classes]),
               TILING: slide_record(plan.magnifications, plan.tile_size, plan.min_tissue),
               **({ANNOTATIONS: annotation_record(raw, geojson_of, annotations_dir)} if annotations_dir else {})},
        members={slide.relative_to(raw).as_posix(): len(parts) for slide, parts in members.items()},
        on_error=on_error, files_of=files_of, workers=workers or os.cpu_count() or 1, layout=layout,
        fingerprint_of=fingerprint, empty=f": no {plan.tile_size} px tile at {max(plan.magnifications):g}x has tissue above "
                                              f"min_tissue={plan.min_tissue:g}",
    )


def ingest_ct(raw: str | Path, out: str | Path, plan: CTPlan = CTPlan(), val_fraction: float = 0.2,
              seed: int = 0, on_error: str = "refuse", shard_mb: int = 0) -> pd.DataFrame:
    """Slices of every CT series under ``raw`` (``<raw>/<label>/...`` or flat), grouped by Series
    Instance UID and written in anatomical order; what is not a CT image is skipped with a reason.
    A series with a gap (a slice missing from the export) is written with a warning naming it;
    2.5D stacking refuses it. ``shard_mb`` > 0 writes each series as shards of up to that size."""
    _check_on_error(on_error)
    layout = ShardLayout(shard_mb << 20, "png", ("png",)) if shard_mb else None
    raw, out = _resolve(raw, out)
    files, hidden = source_files(raw)
    objects, skipped, errors = ct_objects(raw, files)
    skipped = hidden + skipped
    by_series = {}
    for info in itertools.chain.from_iterable(objects.values()):
        by_series.setdefault(info.series_uid or info.path, []).append(info)
    units, warnings = [], []
    for series in by_series.values():
        reason = plan.select.refusal(series[0])
        if reason:
            skipped += [Skipped(p, f"series {series[0].series_uid}: {reason}") for p in sorted({s.path for s in series})]
            continue
        try:
            units.append(order_series(series, plan))
        except IngestError as exc:
            errors += dropped_whole(_series_files(series), [exc])
            continue
        if gap := series_gap(units[-1]):
            warnings.append(f"series {series[0].series_uid}: {gap[1]}: a slice missing from the export?")
    return _publish(raw, out, len(files) + len(hidden), units,
                    lambda series, staging: _series_rows(series, raw, staging, plan, val_fraction, seed,
                                                         partial=on_error == "quarantine"),
                    lambda series: series[0].path, errors, skipped, val_fraction=val_fraction, on_error=on_error,
                    files_of=_series_files, warnings=warnings, layout=layout,
                    extra={TILING: series_record(plan.window, plan.channels, plan.windows)},
                    fingerprint_of=lambda memo, series: _fingerprint(memo, raw, _series_files(series), plan, val_fraction,
                                                                     seed, layout))


def ct_objects(raw: Path, files: list[Path]) -> tuple[dict[str, list[CTSlice]], list[Skipped], list[IngestError]]:
    """The CT image objects among ``files`` (under ``raw``) by SOP Instance UID, their frames from
    the headers; what is not a CT image, skipped with its reason (of two copies of one object, the
    one that does not read); and the files that should be CT images and cannot be read."""
    candidates, skipped = _sort_out(files, lambda p: p.suffix.lower() not in NOT_IMAGES, "DICOM")
    errors, objects = [], {}
    for path in candidates:
        try:
            infos = describe(path)
        except Skipped as skip:
            skipped.append(skip)
            continue
        except IngestError as exc:
            errors.append(exc)
            continue
        uid = infos[0].sop_uid or str(path)
        if uid in objects:
            objects[uid], copy = _one_copy(raw, objects[uid], infos)
            skipped.append(copy)
        else:
            objects[uid] = infos
    return objects, skipped, errors


def _one_copy(raw: Path, first: list[CTSlice], second: list[CTSlice]) -> tuple[list[CTSlice], Skipped]:
    """Of two files holding one SOP Instance UID (exports repeat objects: two studies, two media),
    the one to keep and the other as skipped: the first found, unless only the second's pixels read,
    so that a damaged copy does not cost the series its good original."""
    def problem(infos: list[CTSlice]) -> str | None:
        try:
            read_ct(infos[0].path)
        except IngestError as exc:
            return exc.problem
        return None

    kept, dropped = first, second
    if (damage := problem(first)) and not problem(second):
        kept, dropped = second, first
        why = f", whose pixels read where these do not: {damage}"
    else:
        why = ""
    return kept, Skipped(dropped[0].path, f"duplicate of {Path(kept[0].path).relative_to(raw)} (same SOP Instance UID){why}")


def _series_files(series: list[CTSlice]) -> list[str]:
    return sorted({s.path for s in series})


def ingest_images(raw: str | Path, out: str | Path, mode: str = "rgb", val_fraction: float = 0.2,
                  seed: int = 0, on_error: str = "refuse",
                  value_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """Any image folder as a dataset: ``<raw>/<split>/<class>/<image>`` keeps its splits,
    ``<raw>/<class>/<image>`` (or a flat folder, label ``unlabelled``) is split per image.
    Images are turned upright by their EXIF orientation; images of more than 8 bits are scaled by
    the bits their values use (``dinomx.images.to_model_mode``), or by ``value_range`` if given."""
    if mode not in ("rgb", "gray"):
        raise DataError(f"mode: expected 'rgb' or 'gray', got {mode!r}")
    if value_range is not None and not value_range[0] < value_range[1]:
        raise DataError(f"value_range: expected LOW < HIGH, got {value_range[0]:g}:{value_range[1]:g}")
    _check_on_error(on_error)
    raw, out = _resolve(raw, out)
    files, hidden = source_files(raw)
    images, skipped = [], list(hidden)
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(Skipped(path, f"not an image file ({path.suffix or 'no extension'})"))
    has_splits = any(p.relative_to(raw).parts[0] in ("train", "val", "test") for p in images)

    def rows_of(path: Path, staging: _Staging) -> list[dict]:
        relative = path.relative_to(raw)
        parts = relative.parts
        if has_splits:
            if parts[0] not in ("train", "val", "test"):
                raise IngestError(path, "outside train/, val/ and test/ while the folder has splits")
            split, rest = parts[0], parts[1:]
        else:
            split, rest = split_of(relative.as_posix(), val_fraction, seed), parts
        label = rest[0] if len(rest) > 1 else UNLABELLED
        try:
            with Image.open(path) as img:
                img.load()
                converted = to_model_mode(img, 3 if mode == "rgb" else 1, value_range)
        except DataError as exc:
            raise IngestError(path, str(exc)) from None
        except UNREADABLE as exc:
            raise IngestError(path, f"not a readable image ({image_problem(path, exc)})") from None
        out_path = f"{split}/{label}/{output_stem(relative)}.png"
        staging.save(converted, out_path, relative.as_posix())
        return [{"path": out_path, "modality": mode, "source": relative.as_posix(), "split": split, "label": label,
                 "source_mode": img.mode, "source_width": img.width, "source_height": img.height}]

    return _publish(raw, out, len(files) + len(hidden), images, rows_of, str, [],
                    skipped, val_fraction=val_fraction, on_error=on_error,
                    extra={"value_range.json": json.dumps(value_range)} if value_range else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ingest slides (he), CT DICOM (ct) or an image folder (rgb, gray)")
    parser.add_argument("kind", choices=MODALITIES)
    parser.add_argument("--raw", required=True, help="raw data directory")
    parser.add_argument("--out", required=True, help="dataset directory to (re)create")
    IngestParams.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def ingest() -> None:
        IngestParams.from_args(args.kind, args).ingest(args.raw, args.out)
        summary = json.loads((Path(args.out) / SUMMARY).read_text())
        shards = f" in {summary['shards']} shards" if "shards" in summary else ""
        print(f"{args.out}: {summary['images']} images{shards} from {summary['used']} of {summary['inputs']} inputs "
              f"({summary['skipped']} skipped, listed in {Path(args.out) / SKIPPED}; "
              f"{summary['quarantined']} quarantined, listed in {Path(args.out) / REFUSED})")

    return run_command("ingest", ingest)


if __name__ == "__main__":
    sys.exit(main())
