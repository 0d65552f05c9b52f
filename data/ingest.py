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

    python -m data.ingest he --raw raw --out tiles --magnifications 20 5

This module is the command; each kind of input has its reader (``data.readers``), and
``data.staging`` builds and publishes what they read, with ``data.listing`` keeping account of
every input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd

from data.inputs import REFUSED, SKIPPED, SUMMARY
from data.params import MODALITIES, IngestParams
from data.readers.ct_series import CTPlan, SeriesFilter, ingest_ct
from data.readers.image_folders import ingest_images
from data.readers.slides import ingest_he
from data.wsi import TilePlan
from dinomx.errors import run_command


def ingest(params: IngestParams, raw: str | Path, out: str | Path) -> pd.DataFrame:
    """Build the dataset ``params`` declare at ``out`` from ``raw``; returns its manifest (or its
    table of shards)."""
    common = {"val_fraction": params.val_fraction, "seed": params.seed, "on_error": params.on_error,
              **({"shard_mb": params.shard_mb} if params.sharded else {})}
    if params.modality == "he":
        plan = TilePlan(tuple(params.magnifications), params.tile_size, params.min_tissue)
        return ingest_he(raw, out, plan, cases=params.cases, lenient_annotations=params.lenient_annotations,
                         annotations_dir=params.annotations, workers=params.workers, **common)
    if params.modality == "ct":
        plan = CTPlan(window=params.window, channels=params.channels, select=SeriesFilter(params.thickness, params.kernels),
                      **({"windows": params.windows} if params.windows else {}))
        return ingest_ct(raw, out, plan, **common)
    return ingest_images(raw, out, params.modality, value_range=params.value_range, **common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ingest slides (he), CT DICOM (ct) or an image folder (rgb, gray)")
    parser.add_argument("kind", choices=MODALITIES)
    parser.add_argument("--raw", required=True, help="raw data directory")
    parser.add_argument("--out", required=True, help="dataset directory to (re)create")
    IngestParams.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def build() -> None:
        ingest(IngestParams.from_args(args.kind, args), args.raw, args.out)
        summary = json.loads((Path(args.out) / SUMMARY).read_text())
        shards = f" in {summary['shards']} shards" if "shards" in summary else ""
        print(f"{args.out}: {summary['images']} images{shards} from {summary['used']} of {summary['inputs']} inputs "
              f"({summary['skipped']} skipped, listed in {Path(args.out) / SKIPPED}; "
              f"{summary['quarantined']} quarantined, listed in {Path(args.out) / REFUSED})")

    return run_command("ingest", build)


if __name__ == "__main__":
    sys.exit(main())
