"""Command-line options of the entry points that fit probes on a frozen backbone (``heads`` and
``evaluate``): what the probes are fitted on."""
from __future__ import annotations

import argparse

from projects.tracking import configure_logging


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """What the probes are fitted on: a split image folder, and masks or targets for the dense heads."""
    parser.add_argument("--data", required=True, help="DVC-tracked image folder with train/ and val/ splits")
    parser.add_argument("--validation-report", required=True)
    parser.add_argument("--knn-k", type=float, default=20, help="neighbours of the kNN head (a whole number)")
    parser.add_argument("--masks", default="", help="masks mirroring <data> (classes.json beside it): segmentation")
    parser.add_argument("--targets", default="", help="CSV with 'path' (relative to <data>) and a target column: regression")
    parser.add_argument("--target-column", default="", help="the targets CSV column to regress")


def parse_probe_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, int]:
    """Parsed arguments and the validated kNN k."""
    args = parser.parse_args(argv)
    configure_logging()
    if args.knn_k < 1 or args.knn_k != int(args.knn_k):
        parser.error(f"--knn-k: expected a positive whole number, got {args.knn_k}")
    return args, int(args.knn_k)
