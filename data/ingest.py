"""Turn raw slides, CT exports or plain image folders into a dataset the engine trains on, all or
nothing, without losing or merging an input.

``he``: whole-slide images (with optional ``<slide>.geojson`` annotations beside each slide) ->
``<out>/<mag>x/<split>/<label>/<name>_x<X>_y<Y>.png`` for every requested magnification (same
file name = same place on the slide), ``<out>/masks/...`` (class-index masks of the grid tiles)
when there are annotations. Splits are per case (``--cases`` CSV, else the top folder).

``ct``: DICOM files (``<raw>/<label>/...`` with ``--label <label>``, or flat), grouped into series
and ordered by position -> ``<out>/slices/<split>/<label>/<name>_f<frame>.png``: one window as a
grey slice, or three channels (adjacent slices, or three windows) for an RGB backbone. Splits are
per patient.

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

Nothing written carries a patient identifier: the readers see the raw folder through a view in
which folder and file names are keyed pseudonyms, and the CT reader replaces the identifiers of
the headers (``data.privacy``; a site key is needed, ``python -m data.privacy new-key``).

This module is the command; each kind of input has its reader (``data.readers``), and
``data.staging`` builds and publishes what they read, with ``data.listing`` keeping account of
every input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import pandas as pd

from data.annotations import PROVENANCE
from data.inputs import REFUSED, SKIPPED, SUMMARY
from data.listing import resolve
from data.params import MODALITIES, IngestParams
from data.privacy import Pseudonyms, clear_parts, pseudonymous_folder, pseudonymous_view
from data.readers.ct_series import CTPlan, SeriesFilter, ingest_ct
from data.readers.image_folders import ingest_images
from data.readers.slides import ingest_he
from data.wsi import TilePlan
from dinomx.errors import UserError, run_command


def ingest(params: IngestParams, raw: str | Path, out: str | Path) -> pd.DataFrame:
    """Build the dataset ``params`` declare at ``out`` from ``raw`` under pseudonyms; returns its
    manifest (or its table of shards). The steward's mapping gets this ingest's pseudonyms even
    when the export is refused, so that the refused files can be found from the listing."""
    raw, out = resolve(raw, out)
    names = Pseudonyms.load(away_from=(raw, out))
    out.parent.mkdir(parents=True, exist_ok=True)
    view = None
    try:
        with contextlib.ExitStack() as views:
            view = views.enter_context(pseudonymous_view(raw, names, clear_parts(params.modality, params.labels, raw),
                                                         at=_beside(out, "raw")))
            return _read(params, view, out, names, views)
    except UserError as exc:
        # Said where the user looks: the raw folder they gave, its files by their pseudonyms.
        if view is not None:
            exc.args = tuple(a.replace(str(view), str(raw)) if isinstance(a, str) else a for a in exc.args)
        raise
    finally:
        names.save()
        _beside(out, "cases.csv").unlink(missing_ok=True)


def _read(params: IngestParams, raw: Path, out: Path, names: Pseudonyms, views: contextlib.ExitStack) -> pd.DataFrame:
    common = {"val_fraction": params.val_fraction, "seed": params.seed, "on_error": params.on_error,
              **({"shard_mb": params.shard_mb} if params.sharded else {})}
    if params.modality == "he":
        plan = TilePlan(tuple(params.magnifications), params.tile_size, params.min_tissue)
        annotations = params.annotations and views.enter_context(
            pseudonymous_view(Path(params.annotations), names, lambda parts: int(parts == (PROVENANCE,)),
                              at=_beside(out, "annotations")))
        return ingest_he(raw, out, plan, cases=params.cases and _cases(Path(params.cases), names, _beside(out, "cases.csv")),
                         lenient_annotations=params.lenient_annotations, annotations_dir=annotations,
                         workers=params.workers, **common)
    if params.modality == "ct":
        plan = CTPlan(window=params.window, channels=params.channels, select=SeriesFilter(params.thickness, params.kernels),
                      **({"windows": params.windows} if params.windows else {}))
        return ingest_ct(raw, out, plan, pseudonyms=names, **common)
    return ingest_images(raw, out, params.modality, value_range=params.value_range, **common)


def _beside(out: Path, what: str) -> Path:
    """Where ingestion keeps its pseudonymous views of the inputs while it runs: beside the dataset
    (``pseudonymous_folder``), never in it."""
    return pseudonymous_folder(out) / what


def _cases(cases: Path, names: Pseudonyms, into: Path) -> Path:
    """The ``--cases`` table in the view's names: each slide's pseudonymous path, each case's
    pseudonym (a case is a patient). One that does not read is handed on as it is, to be refused
    with its reason."""
    try:
        table = pd.read_csv(cases, dtype=str)
    except (OSError, ValueError):
        return cases
    if not {"slide", "case"} <= set(table.columns):
        return cases
    table["slide"] = [names.path(Path(s), 0).as_posix() if isinstance(s, str) else s for s in table["slide"]]
    table["case"] = [names.of("case", c) if isinstance(c, str) else c for c in table["case"]]
    table.to_csv(into, index=False)
    return into


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
