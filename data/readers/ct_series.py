"""CT DICOM exports -> series grouped by Series Instance UID and ordered along the slice normal,
written as windowed grey slices or three-channel images (adjacent slices, or three windows)."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data.dicom import CTFrame, CTSlice, describe, read_ct, window
from data.inputs import CHANNELS, NOT_IMAGES, IngestError, Skipped, file_md5, output_stem
from data.listing import (
    UNLABELLED,
    IngestErrors,
    Partial,
    check_on_error,
    dropped_whole,
    resolve,
    sort_out,
    source_files,
    split_of,
)
from data.metadata import BLANK_STD
from data.privacy import Pseudonyms
from data.staging import Found, ShardLayout, Staging, Target, Units, fingerprint, publish
from data.tiling import TILING, series_record
from dinomx.errors import DataError

log = logging.getLogger(__name__)


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


def _series_rows(series: list[CTSlice], raw: Path, staging: Staging, plan: CTPlan, val_fraction: float,
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


def ingest_ct(raw: str | Path, out: str | Path, plan: CTPlan = CTPlan(), val_fraction: float = 0.2,
              seed: int = 0, on_error: str = "refuse", shard_mb: int = 0,
              pseudonyms: Pseudonyms | None = None) -> pd.DataFrame:
    """Slices of every CT series under ``raw`` (``<raw>/<label>/...`` or flat), grouped by Series
    Instance UID and written in anatomical order; what is not a CT image is skipped with a reason.
    A series with a gap (a slice missing from the export) is written with a warning naming it;
    2.5D stacking refuses it. ``shard_mb`` > 0 writes each series as shards of up to that size.
    ``pseudonyms`` (``data.ingest`` always gives them) replace the patient, series and instance
    identifiers of the headers before anything uses them."""
    check_on_error(on_error)
    layout = ShardLayout(shard_mb << 20, "png", ("png",)) if shard_mb else None
    raw, out = resolve(raw, out)
    files, hidden = source_files(raw)
    objects, skipped, errors = ct_objects(raw, files, pseudonyms)
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
    return publish(raw, Units(units, lambda series, staging: _series_rows(series, raw, staging, plan, val_fraction, seed,
                                                                          partial=on_error == "quarantine"),
                              name_of=lambda series: series[0].path, files_of=_series_files,
                              fingerprint_of=lambda memo, series: fingerprint(memo, raw, _series_files(series), plan,
                                                                              val_fraction, seed, layout)),
                   Found(len(files) + len(hidden), skipped, errors, warnings),
                   Target(out, on_error, val_fraction, layout, {TILING: series_record(plan.window, plan.channels, plan.windows)}))


def ct_objects(raw: Path, files: list[Path], pseudonyms: Pseudonyms | None = None,
               ) -> tuple[dict[str, list[CTSlice]], list[Skipped], list[IngestError]]:
    """The CT image objects among ``files`` (under ``raw``) by SOP Instance UID, their frames from
    the headers; what is not a CT image, skipped with its reason (of two copies of one object, the
    one that does not read; an image with text burned into its pixels); and the files that should
    be CT images and cannot be read."""
    candidates, skipped = sort_out(files, lambda p: p.suffix.lower() not in NOT_IMAGES, "DICOM")
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
        if infos[0].burned_in:
            skipped.append(Skipped(path, "BurnedInAnnotation YES: text burned into the pixels may name the patient; "
                                         "set aside (the raw export keeps it)"))
            continue
        if pseudonyms is not None:
            infos = _pseudonymised(infos, pseudonyms)
        uid = infos[0].sop_uid or str(path)
        if uid in objects:
            objects[uid], copy = _one_copy(raw, objects[uid], infos)
            skipped.append(copy)
        else:
            objects[uid] = infos
    return objects, skipped, errors


def _pseudonymised(infos: list[CTSlice], names: Pseudonyms) -> list[CTSlice]:
    """A file's frames with keyed pseudonyms for its identifiers: a missing one is named by the
    file's bytes (a patient without an ID, by its series, as the series is then its only unit);
    the free-text series description is dropped."""
    first = infos[0]
    content = "" if first.series_uid else f"content md5 {file_md5(first.path)}"
    fields = {"patient_id": names.of("patient", first.patient_id or (first.series_uid and f"series {first.series_uid}")
                                     or content),
              "series_uid": names.of("series", first.series_uid or content), "description": "",
              "sop_uid": names.of("instance", first.sop_uid) if first.sop_uid else ""}
    return [replace(info, **fields) for info in infos]


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
