"""Turn raw slides or CT studies into a tile dataset the engine trains on, all or nothing.

``he``: whole-slide images (with optional ``<slide>.geojson`` annotations beside each slide) ->
``<out>/<mag>x/<split>/<label>/<slide>_x<X>_y<Y>.png`` for every requested magnification (same
file name = same place on the slide), ``<out>/masks/...`` (class-index masks of the grid tiles)
when there are annotations.

``ct``: DICOM files (``<raw>/<label>/...`` or flat) -> ``<out>/slices/<split>/<label>/*.png``,
windowed single-channel slices in Hounsfield units.

Both write ``<out>/manifest.csv``: one row per image file with its provenance and the statistics
the validation suites check. Everything is written to a staging folder first and moved into
place only when every input was good; a bad input leaves ``<out>`` as it was.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.annotations import BACKGROUND, majority_label, read_regions, tile_mask
from data.dicom import read_ct, window
from data.inputs import IngestError, within
from data.metadata import MANIFEST
from data.wsi import SLIDE_SUFFIXES, TilePlan, open_slide, tile_slide
from dinomx.augmentations import rgb_to_hed
from dinomx.errors import UserError

log = logging.getLogger(__name__)
UNLABELLED = "unlabelled"
NOT_DICOM = {".json", ".txt", ".md", ".csv"}


class IngestFailed(UserError, RuntimeError):
    """Some inputs were refused; nothing was written. ``errors`` holds one IngestError per input."""

    def __init__(self, errors: list[IngestError]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} input(s) refused, nothing written:\n{lines}")


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """Deterministic split per slide / patient, so no patient lands in both train and val."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def source_files(raw: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Non-hidden files under ``raw`` that ``keep`` accepts; a link that points outside ``raw`` is refused."""
    if not raw.is_dir():
        raise IngestError(raw, "raw data directory not found")
    files = []
    for path in sorted(raw.rglob("*")):
        relative = path.relative_to(raw)
        if any(part.startswith(".") for part in relative.parts) or path.is_dir():
            continue
        within(raw, relative)
        if keep(path):
            files.append(path)
    if not files:
        raise IngestError(raw, "no input files found")
    return files


def stain_statistics(tile: Image.Image) -> dict:
    rgb = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255).permute(2, 0, 1)
    hed = rgb_to_hed(rgb).mean(dim=(1, 2))
    return {"hematoxylin_mean": float(hed[0]), "eosin_mean": float(hed[1])}


def _save(image: Image.Image, staging: Path, relative: str) -> None:
    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)


def _slide_rows(slide_path: Path, raw: Path, staging: Path, plan: TilePlan, annotations: dict,
                classes: list[str], val_fraction: float, seed: int) -> list[dict]:
    relative = slide_path.relative_to(raw).as_posix()
    regions = annotations.get(slide_path)
    split = split_of(relative, val_fraction, seed)
    rows = []
    slide, info = open_slide(slide_path)
    try:
        for tile in tile_slide(slide, info, plan):
            label, mask = UNLABELLED, None
            if regions is not None:
                mask = tile_mask(regions, classes, tile.x, tile.y, tile.size, plan.tile_size)
                label = majority_label(mask, classes)
            folder = f"{split}/{label}/{slide_path.stem}_x{tile.x}_y{tile.y}.png"
            if mask is not None:
                _save(Image.fromarray(mask), staging, f"masks/{folder}")
            for mag, image in tile.images.items():
                _save(image, staging, f"{mag:g}x/{folder}")
                rows.append({
                    "path": f"{mag:g}x/{folder}", "modality": "he", "source": relative, "split": split,
                    "label": label, "magnification": mag,
                    "mpp": info.mpp * info.objective_power / mag if info.mpp else None,
                    "objective_power": info.objective_power, "x": tile.x, "y": tile.y,
                    "level0_size": tile.size, "tissue_fraction": tile.tissue_fraction,
                    "mask": f"masks/{folder}" if mask is not None else None,
                    **stain_statistics(image),
                })
    finally:
        slide.close()
    log.info("%s: %d tiles at %s (scanned at %gx)", relative, len(rows) // len(plan.magnifications),
             "/".join(f"{m:g}x" for m in plan.magnifications), info.objective_power)
    return rows


def _ct_rows(path: Path, raw: Path, staging: Path, center: float, width: float, val_fraction: float,
             seed: int) -> list[dict]:
    relative = path.relative_to(raw)
    label = relative.parts[0] if len(relative.parts) > 1 else UNLABELLED
    rows = []
    for frame in read_ct(path):
        split = split_of(frame.patient_id or frame.series_uid or relative.as_posix(), val_fraction, seed)
        out = f"slices/{split}/{label}/{relative.with_suffix('').as_posix().replace('/', '_')}_f{frame.frame}.png"
        _save(Image.fromarray(window(frame.hu, center, width)), staging, out)
        rows.append({
            "path": out, "modality": "ct", "source": relative.as_posix(), "split": split, "label": label,
            "frame": frame.frame, "hu_min": float(frame.hu.min()), "hu_max": float(frame.hu.max()),
            "hu_mean": float(frame.hu.mean()), "padding_fraction": frame.padding_fraction,
            "pixel_spacing_row": frame.pixel_spacing[0] if frame.pixel_spacing else None,
            "pixel_spacing_col": frame.pixel_spacing[1] if frame.pixel_spacing else None,
            "slice_thickness": frame.slice_thickness, "window_center": center, "window_width": width,
        })
    log.info("%s: %d CT frame(s)", relative, len(rows))
    return rows


def _write_all(raw: Path, out: Path, sources: list[Path], rows_of: Callable[[Path, Path], list[dict]],
               extra: dict[str, str] | None = None) -> pd.DataFrame:
    """Run ``rows_of(source, staging)`` for every source; publish ``out`` only if none was refused.
    Every source is tried, so one run reports every bad file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.ingest-", dir=out.parent))
    try:
        errors, rows = [], []
        for source in sources:
            try:
                rows += rows_of(source, staging)
            except IngestError as exc:
                errors.append(exc)
        if not errors and not rows:
            errors.append(IngestError(raw, "no tiles produced (is there tissue above min_tissue?)"))
        if errors:
            raise IngestFailed(errors)
        manifest = pd.DataFrame(rows)
        manifest.to_csv(staging / MANIFEST, index=False)
        for name, text in (extra or {}).items():
            (staging / name).write_text(text)
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        if out.exists():
            out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _resolve(raw: str | Path, out: str | Path) -> tuple[Path, Path]:
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise IngestError(out, f"output must not overlap the raw data directory {raw}")
    return raw, out


def ingest_he(raw: str | Path, out: str | Path, plan: TilePlan, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    raw, out = _resolve(raw, out)
    slides = source_files(raw, lambda p: p.suffix.lower() in SLIDE_SUFFIXES)
    annotations, errors = {}, []
    for slide in slides:
        geojson = slide.with_suffix(".geojson")
        if geojson.is_file():
            try:
                annotations[slide] = read_regions(within(raw, geojson.relative_to(raw)))
            except IngestError as exc:
                errors.append(exc)
    if errors:
        raise IngestFailed(errors)
    classes = sorted({r.name for regions in annotations.values() for r in regions})
    return _write_all(
        raw, out, slides,
        lambda slide, staging: _slide_rows(slide, raw, staging, plan, annotations, classes, val_fraction, seed),
        extra={"classes.json": json.dumps([BACKGROUND, *classes])},
    )


def ingest_ct(raw: str | Path, out: str | Path, center: float = 40, width: float = 400, val_fraction: float = 0.2,
              seed: int = 0) -> pd.DataFrame:
    raw, out = _resolve(raw, out)
    files = source_files(raw, lambda p: p.suffix.lower() not in NOT_DICOM)
    return _write_all(raw, out, files,
                      lambda path, staging: _ct_rows(path, raw, staging, center, width, val_fraction, seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ingest raw slides (he) or CT DICOM (ct) into a tile dataset")
    parser.add_argument("kind", choices=["he", "ct"])
    parser.add_argument("--raw", required=True, help="raw data directory")
    parser.add_argument("--out", required=True, help="dataset directory to (re)create")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnifications", type=float, nargs="+", default=[20, 10, 5], help="he: highest first")
    parser.add_argument("--tile-size", type=int, default=224, help="he: tile side in pixels")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="he: minimum tissue fraction of a tile")
    parser.add_argument("--window", type=float, nargs=2, default=[40, 400], metavar=("CENTER", "WIDTH"),
                        help="ct: HU window of the written slices")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.kind == "he":
            plan = TilePlan(tuple(args.magnifications), args.tile_size, args.min_tissue)
            manifest = ingest_he(args.raw, args.out, plan, args.val_fraction, args.seed)
        else:
            manifest = ingest_ct(args.raw, args.out, *args.window, args.val_fraction, args.seed)
    except (IngestError, IngestFailed, ValueError) as exc:
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(manifest)} image files from {manifest['source'].nunique()} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
