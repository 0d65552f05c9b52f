"""Whole-slide images (OpenSlide): objective power, microns per pixel, tissue detection, and tiles
at several magnifications that stay spatially aligned.

Tiles are laid on a grid at the highest requested magnification; each lower magnification gets a
tile of the same pixel size centred on the same point, so it shows the surrounding context (what a
teacher sees in Magnification-Aware Distillation while the student sees the detail).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from data.inputs import IngestError
from dinomx.errors import DataError

# DICOM whole-slide images (VL Whole Slide Microscopy Image Storage) are read by OpenSlide 4 too.
WHOLE_SLIDE_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
# Saturation (0-255) above which a thumbnail pixel counts as stained tissue: glass and white
# background are nearly grey, H&E is not.
TISSUE_SATURATION = 20
# Thumbnail pixels per grid tile side used to estimate tissue fraction.
MASK_RESOLUTION = 8
# The tissue mask is read in squares of this many pixels of the pyramid level it comes from, so a
# slide with no small level (or a truncated one claiming 40000 x 35000) never has a whole level
# decoded at once.
MASK_CHUNK = 2048


@dataclass(frozen=True)
class SlideInfo:
    path: str
    vendor: str
    width: int  # level 0
    height: int
    objective_power: float
    mpp: float | None  # microns per level-0 pixel


@dataclass(frozen=True)
class TilePlan:
    magnifications: tuple[float, ...]  # highest first; the grid is laid at the first
    tile_size: int = 224
    min_tissue: float = 0.5

    def __post_init__(self):
        if not self.magnifications:
            raise DataError("magnifications: give at least one (e.g. 20 10 5)")
        if any(m <= 0 for m in self.magnifications):
            raise DataError(f"magnifications: must be positive, got {list(self.magnifications)}")
        object.__setattr__(self, "magnifications", tuple(sorted(self.magnifications, reverse=True)))
        if self.tile_size < 8:
            raise DataError(f"tile_size: must be at least 8 pixels, got {self.tile_size}")
        if not 0 <= self.min_tissue <= 1:
            raise DataError(f"min_tissue: a fraction in [0, 1], got {self.min_tissue}")


@dataclass
class SlideTile:
    x: int  # level-0 top-left of the grid (highest-magnification) tile
    y: int
    size: int  # level-0 side of the grid tile
    tissue_fraction: float
    images: dict[float, Image.Image]  # magnification -> RGB tile, all centred on the same point


def open_slide(path: str | Path) -> tuple[openslide.OpenSlide, SlideInfo]:
    """Open a slide and read its scan resolution; unreadable or unscaled slides are refused."""
    if Path(path).stat().st_size == 0:
        raise IngestError(path, "empty file (0 bytes)")
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
        raise IngestError(path, f"not a readable whole-slide image ({type(exc).__name__}: {exc})") from exc
    props = slide.properties
    mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power is None and mpp is None:
        slide.close()
        raise IngestError(path, "slide records neither objective power nor microns per pixel; "
                                "magnifications cannot be computed")
    # Without a recorded objective, the usual convention 10 / mpp (0.25 um/px ~ 40x) applies.
    objective = float(power) if power is not None else 10.0 / float(mpp)
    info = SlideInfo(
        path=str(path),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "generic-tiff"),
        width=slide.dimensions[0],
        height=slide.dimensions[1],
        objective_power=objective,
        mpp=float(mpp) if mpp is not None else None,
    )
    return slide, info


def thumbnail(slide: openslide.OpenSlide, downsample: float) -> Image.Image:
    """The slide at ``1 / downsample`` of level 0 on white, read chunk by chunk from the pyramid
    level closest to that resolution: memory stays bounded whatever the slide claims. Only the
    pyramid is read, never the label or macro image beside it (they may show a patient's name)."""
    width, height = slide.dimensions
    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    level_downsample = slide.level_downsamples[level]
    level_w, level_h = slide.level_dimensions[level]
    scale = level_downsample / downsample  # mask pixels per level pixel
    thumb = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    for top in range(0, level_h, MASK_CHUNK):
        for left in range(0, level_w, MASK_CHUNK):
            size = (min(MASK_CHUNK, level_w - left), min(MASK_CHUNK, level_h - top))
            region = slide.read_region((round(left * level_downsample), round(top * level_downsample)), level, size)
            box = (math.floor(left * scale), math.floor(top * scale),
                   min(out_w, math.ceil((left + size[0]) * scale)), min(out_h, math.ceil((top + size[1]) * scale)))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            canvas = Image.new("RGB", region.size, (255, 255, 255))
            canvas.paste(region, mask=region.getchannel("A"))
            thumb.paste(canvas.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BOX), box[:2])
    return thumb


def tissue_mask(slide: openslide.OpenSlide, downsample: float) -> np.ndarray:
    """Boolean tissue mask of the slide at ``1 / downsample`` of level 0 (``thumbnail``)."""
    return np.asarray(thumbnail(slide, downsample).convert("HSV"))[..., 1] > TISSUE_SATURATION


def _read(slide: openslide.OpenSlide, path: str, cx: float, cy: float, field: float, tile_size: int) -> Image.Image:
    """A ``tile_size`` RGB tile covering ``field`` level-0 pixels centred on (cx, cy); white beyond
    the slide edge."""
    level = slide.get_best_level_for_downsample(field / tile_size)
    level_downsample = slide.level_downsamples[level]
    side = max(1, math.ceil(field / level_downsample))
    try:
        region = slide.read_region((round(cx - field / 2), round(cy - field / 2)), level, (side, side))
    except openslide.OpenSlideError as exc:
        raise IngestError(path, f"slide data is corrupt or truncated ({exc})") from exc
    canvas = Image.new("RGB", region.size, (255, 255, 255))
    canvas.paste(region, mask=region.getchannel("A"))
    return canvas.resize((tile_size, tile_size), Image.Resampling.BOX) if side != tile_size else canvas


def tile_slide(slide: openslide.OpenSlide, info: SlideInfo, plan: TilePlan,
               read: tuple[float, ...] | None = None) -> Iterator[SlideTile]:
    """Grid tiles with at least ``plan.min_tissue`` tissue, each at every requested magnification
    (or those of ``read`` only: the grid and which tiles are kept stay the plan's)."""
    too_high = [m for m in plan.magnifications if m > info.objective_power * 1.001]
    if too_high:
        raise IngestError(info.path, f"scanned at {info.objective_power:g}x; cannot tile at "
                                     f"{', '.join(f'{m:g}x' for m in too_high)} "
                                     "without inventing detail")
    grid = plan.tile_size * info.objective_power / plan.magnifications[0]
    size = round(grid)
    mask_downsample = grid / MASK_RESOLUTION
    try:
        mask = tissue_mask(slide, mask_downsample)
    except openslide.OpenSlideError as exc:
        raise IngestError(info.path, f"slide data is corrupt or truncated ({exc})") from None
    for y in range(0, info.height - size + 1, size):
        for x in range(0, info.width - size + 1, size):
            r0, c0 = int(y / mask_downsample), int(x / mask_downsample)
            footprint = mask[r0:r0 + MASK_RESOLUTION, c0:c0 + MASK_RESOLUTION]
            fraction = float(footprint.mean()) if footprint.size else 0.0
            if fraction < plan.min_tissue:
                continue
            cx, cy = x + size / 2, y + size / 2
            images = {
                m: _read(slide, info.path, cx, cy, plan.tile_size * info.objective_power / m, plan.tile_size)
                for m in (read or plan.magnifications)
            }
            yield SlideTile(x=x, y=y, size=size, tissue_fraction=fraction, images=images)
