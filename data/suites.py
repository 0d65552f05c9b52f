"""Great Expectations suites, one per modality, over the metadata rows of a dataset.

Values that depend on the pipeline's parameters (tile size, magnifications, minimum tissue) are
suite parameters (``$PARAMETER``), so the stored suites stay the same whatever the dataset and the
values come from ``params.yaml`` at validation time, never from the data being checked.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import great_expectations.expectations as gxe

from data.metadata import BLANK_STD, FAINT_RANGE


def _param(name: str) -> dict:
    return {"$PARAMETER": name}


def _readable_images(mode: str, channels: int, blank_allowed: float | None = 0.0) -> list[gxe.Expectation]:
    """``blank_allowed``: the fraction of flat images tolerated; None where the suite judges
    flat images otherwise (CT, per series)."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="path"),
        gxe.ExpectColumnValuesToBeInSet(column="is_image_file", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=[mode]),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        gxe.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
    ] + ([] if blank_allowed is None else [
        # A blank (constant) tile carries no signal and usually means a broken export.
        gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=BLANK_STD, mostly=1.0 - blank_allowed),
    ])


def _square(size_param: str) -> list[gxe.Expectation]:
    return [
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=_param(size_param), max_value=_param(size_param)),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=_param(size_param), max_value=_param(size_param)),
    ]


def image_tiles(channels: int) -> list[gxe.Expectation]:
    """Pre-tiled image folders (the demo data): parameter ``tile_size``."""
    return _readable_images("RGB" if channels == 3 else "L", channels) + _square("tile_size")


def he_tiles() -> list[gxe.Expectation]:
    """H&E tiles cut from slides: parameters ``tile_size``, ``magnifications``, ``min_tissue``."""
    return _readable_images("RGB", 3) + _square("tile_size") + [
        gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=["he"]),
        gxe.ExpectColumnValuesToBeInSet(column="magnification", value_set=_param("magnifications")),
        gxe.ExpectColumnValuesToNotBeNull(column="mpp"),
        # 0.1-20 um/px spans 100x down to 0.5x; outside it the slide's calibration is wrong.
        gxe.ExpectColumnValuesToBeBetween(column="mpp", min_value=0.1, max_value=20.0),
        gxe.ExpectColumnValuesToBeBetween(column="tissue_fraction", min_value=_param("min_tissue"), max_value=1.0),
        # Stained tissue has haematoxylin; tiles without it are pen marks, blur or glass.
        gxe.ExpectColumnValuesToBeBetween(column="hematoxylin_mean", min_value=0.05, max_value=3.0, mostly=0.95),
        gxe.ExpectColumnValuesToBeBetween(column="eosin_mean", min_value=-1.0, max_value=2.0),
    ]


def images(channels: int) -> list[gxe.Expectation]:
    """Any image folder converted by ``data.ingest rgb|gray``: readable 8-bit images of any size
    (natural image sets hold the odd near-blank picture: at most 1 %)."""
    return _readable_images("RGB" if channels == 3 else "L", channels, blank_allowed=0.01) + [
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=8),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=8),
        # Less than a third of the 8-bit range is a faint image: a 10-14-bit image divided by the
        # 16-bit range (0..64), or an underexposed export. Natural sets hold the odd one.
        gxe.ExpectColumnValuesToBeBetween(column="dynamic_range", min_value=FAINT_RANGE, mostly=0.99),
    ]


def ct_slices(channels: int = 1) -> list[gxe.Expectation]:
    """Windowed CT slices: Hounsfield ranges and geometry of the source DICOM. Values below air
    were set to air and values above ``HU_CEILING`` (metal) to it at ingestion
    (``below_air_fraction``, ``above_ceiling_fraction`` say how much).

    Flat slices are judged per series: the first and last slices of a head or body scan are air
    and flat in any window, so a slice may be blank, but a series mostly blank is a wrong window
    or rescale."""
    return _readable_images("L" if channels == 1 else "RGB", channels, blank_allowed=None) + [
        gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=["ct"]),
        gxe.ExpectColumnValuesToBeBetween(column="series_blank_fraction", max_value=0.5),
        # Below air or far above dense bone means a wrong or missing rescale, not anatomy; an
        # implant covers a small part of a slice, a wrong rescale most of it.
        gxe.ExpectColumnValuesToBeBetween(column="hu_min", min_value=-1024.0),
        gxe.ExpectColumnValuesToBeBetween(column="hu_max", max_value=4000.0),
        gxe.ExpectColumnValuesToBeBetween(column="above_ceiling_fraction", max_value=0.2),
        gxe.ExpectColumnValuesToNotBeNull(column="pixel_spacing_row"),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_spacing_row", min_value=0.05, max_value=5.0),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_spacing_col", min_value=0.05, max_value=5.0),
        gxe.ExpectColumnValuesToBeBetween(column="slice_thickness", min_value=0.1, max_value=20.0),
        gxe.ExpectColumnValuesToBeBetween(column="padding_fraction", max_value=0.9),
    ]


@dataclass(frozen=True)
class Suite:
    build: Callable[[], list[gxe.Expectation]]
    parameters: tuple[str, ...]  # suite parameters a run must supply

    def fingerprint(self) -> str:
        """What the suite checks: results kept from an older suite are not this one's."""
        return json.dumps([e.configuration.to_json_dict() for e in self.build()], sort_keys=True, default=str)


SUITES = {
    "image_tiles_rgb": Suite(lambda: image_tiles(3), ("tile_size",)),
    "image_tiles_gray": Suite(lambda: image_tiles(1), ("tile_size",)),
    "he_tiles": Suite(he_tiles, ("tile_size", "magnifications", "min_tissue")),
    "ct_slices": Suite(ct_slices, ()),
    "ct_slices_stacked": Suite(lambda: ct_slices(3), ()),
    "images_rgb": Suite(lambda: images(3), ()),
    "images_gray": Suite(lambda: images(1), ()),
}
