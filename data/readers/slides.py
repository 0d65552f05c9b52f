"""Whole-slide images -> tiles at every requested magnification (same file name = same place on
the slide), class masks from their annotations, split per case."""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
from PIL import Image

from data.annotations import ANNOTATIONS, BACKGROUND, annotation_record, majority_label, read_regions, tile_mask
from data.inputs import IngestError, Skipped, output_stem, within
from data.listing import UNLABELLED, check_on_error, dropped_whole, resolve, sort_out, source_files, split_of
from data.readers.dicom_slides import dicom_slides
from data.shards import Md5Memo
from data.staging import Found, ShardLayout, Staging, Target, Units, fingerprint, publish
from data.tiling import TILING, slide_record
from data.wsi import SLIDE_SUFFIXES, TilePlan, open_slide, tile_slide
from dinomx.images import stain_means

log = logging.getLogger(__name__)


def stain_statistics(tile: Image.Image) -> dict:
    """Mean haematoxylin and eosin of an RGB tile, by the engine's HED transform (the one its stain
    augmentation jitters), from per-channel histograms."""
    hematoxylin, eosin = stain_means(np.asarray(tile.convert("RGB")))
    return {"hematoxylin_mean": hematoxylin, "eosin_mean": eosin}


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
                splits: dict[Path, str], slide_path: Path, staging: Staging) -> list[dict]:
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


def _is_slide(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES


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
    check_on_error(on_error)
    raw, out = resolve(raw, out)
    if annotations_dir is not None and not Path(annotations_dir).is_dir():
        raise IngestError(annotations_dir, "annotations: not a folder (expected <slide path>.geojson files)")
    files, hidden = source_files(raw)
    slides, members, dicom_skipped, errors = dicom_slides([f for f in files if f.suffix.lower() == ".dcm"])
    others, not_slides = sort_out([f for f in files if f.suffix.lower() not in (".geojson", ".dcm")], _is_slide, "slide")
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

    def slide_fingerprint(memo: Md5Memo, slide: Path) -> str:
        regions = memo.md5(geojson_of[slide]) if slide in annotations else None
        return fingerprint(memo, raw, files_of(slide), plan, classes, case_of[slide], splits[slide], layout,
                           lenient_annotations, regions)

    return publish(
        raw,
        Units(slides, functools.partial(_slide_rows, raw, plan, annotations, classes, case_of, splits),
              files_of=files_of, fingerprint_of=slide_fingerprint, workers=workers or os.cpu_count() or 1),
        Found(len(files) + len(hidden), skipped, errors,
              members={slide.relative_to(raw).as_posix(): len(parts) for slide, parts in members.items()}),
        Target(out, on_error, val_fraction, layout,
               extra={"classes.json": json.dumps([BACKGROUND, *classes]),
                      TILING: slide_record(plan.magnifications, plan.tile_size, plan.min_tissue),
                      **({ANNOTATIONS: annotation_record(raw, geojson_of, annotations_dir)} if annotations_dir else {})},
               empty=f": no {plan.tile_size} px tile at {max(plan.magnifications):g}x has tissue above "
                     f"min_tissue={plan.min_tissue:g}"),
    )
