"""Validate a dataset with a Great Expectations checkpoint before anything trains on it.

The GX file context lives in ``data/gx`` of the repository holding the dataset; each run stores
its suite, checkpoint and result there and rebuilds the Data Docs site. A failing suite exits
non-zero (so ``dvc repro`` stops) and leaves a JSON report naming each failing expectation and
the files that broke it, and the path of the Data Docs site, whose newest page of the suite is
that run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context import FileDataContext
from great_expectations.data_context.types.base import ProgressBarsConfig

from data.inputs import REFUSED, SKIPPED, SUMMARY
from data.metadata import dataset_metadata
from data.report import Failure, ValidationReport
from data.suites import SUITES
from data.versioning import UntrackedDataError, find_repo_root
from dinomx.errors import DataError, run_command

logging.getLogger("great_expectations").setLevel(logging.ERROR)


def context_root(dataset: Path) -> Path:
    """``data/`` of the repository (DVC or git) holding ``dataset``, else beside the dataset."""
    for candidate in [dataset, *dataset.parents]:
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate / "data"
    return dataset.parent


def file_context(root: Path) -> FileDataContext:
    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _checkpoint(context: FileDataContext, suite_name: str) -> gx.Checkpoint:
    """Suite, validation definition and checkpoint of ``suite_name`` as the code defines them."""
    source = context.data_sources.add_or_update_pandas("datasets")
    asset = next((a for a in source.assets if a.name == "metadata"), None) or source.add_dataframe_asset("metadata")
    batch = next((b for b in asset.batch_definitions if b.name == "all"), None) or (
        asset.add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=suite_name, expectations=SUITES[suite_name].build()))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
    return context.checkpoints.add_or_update(gx.Checkpoint(
        name=suite_name,
        validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    ))


def validate_frame(frame: pd.DataFrame, suite_name: str, parameters: dict, dataset: str,
                   context_dir: Path) -> ValidationReport:
    if suite_name not in SUITES:
        raise DataError(f"suite: expected one of {sorted(SUITES)}, got {suite_name!r}")
    missing = [p for p in SUITES[suite_name].parameters if p not in parameters]
    if missing:
        raise DataError(f"suite {suite_name} needs parameter(s) {missing} (--{missing[0].replace('_', '-')})")
    context = file_context(context_dir)
    run = _checkpoint(context, suite_name).run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
    result = next(iter(run.run_results.values()))
    docs = context.get_docs_sites_urls()
    failures = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        details = r.result or {}
        files = [row["path"] for row in details.get("unexpected_index_list") or [] if isinstance(row, dict)]
        bounds = {k: v for k, v in config.kwargs.items() if k not in ("column", "result_format", "batch_id")}
        failures.append(
            Failure(
                expectation=config.type,
                column=config.kwargs.get("column"),
                unexpected_count=int(details.get("unexpected_count") or 0),
                files=files,
                expected=", ".join(f"{k}={v}" for k, v in bounds.items()),
                observed=[_plain(v) for v in (details.get("unexpected_list") or [])[: len(files)]],
            )
        )
    return ValidationReport(
        suite=suite_name,
        dataset=dataset,
        success=bool(result.success),
        rows=len(frame),
        evaluated_expectations=len(result.results),
        failures=failures,
        data_docs=docs[0]["site_url"].removeprefix("file://") if docs else None,
    )


def _plain(value):
    """A JSON-ready value (numpy scalars from the metadata frame are not)."""
    return value.item() if hasattr(value, "item") else value


def validate_dataset(root: str | Path, suite: str, parameters: dict,
                     context_dir: str | Path | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    root = Path(root)
    frame = dataset_metadata(root)
    context_dir = Path(context_dir) if context_dir else context_root(root.resolve())
    report = validate_frame(frame, suite, parameters, repo_relative(root, root), context_dir)
    if (root / SKIPPED).is_file():
        report.skipped = pd.read_csv(root / SKIPPED, dtype=str).to_dict("records")
    if (root / REFUSED).is_file():
        report.quarantined = pd.read_csv(root / REFUSED, dtype=str).to_dict("records")
    if (root / SUMMARY).is_file():
        report.ingest = json.loads((root / SUMMARY).read_text())
    if report.data_docs:
        report.data_docs = repo_relative(Path(report.data_docs), root)
    return report, frame


def repo_relative(path: Path, dataset: Path) -> str:
    """``path`` relative to the DVC repository holding ``dataset``, so reports stay true wherever
    the repository is checked out (absolute outside a repository)."""
    try:
        return path.resolve().relative_to(find_repo_root(dataset.resolve())).as_posix()
    except (UntrackedDataError, ValueError):
        return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a dataset with a Great Expectations checkpoint")
    parser.add_argument("--dataset", required=True, help="an image folder (<split>/<class>/<image>) or an ingested dataset")
    parser.add_argument("--report-dir", required=True, help="where report.json and metadata.csv go")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--tile-size", type=int, help="expected tile side (image_tiles_*, he_tiles)")
    parser.add_argument("--magnifications", type=float, nargs="+", help="expected magnifications (he_tiles)")
    parser.add_argument("--min-tissue", type=float, help="minimum tissue fraction (he_tiles)")
    parser.add_argument("--context-root", help="folder holding the GX file context gx/ (default: <repo>/data)")
    args = parser.parse_args(argv)
    parameters = {k: v for k, v in {"tile_size": args.tile_size, "magnifications": args.magnifications,
                                     "min_tissue": args.min_tissue}.items() if v is not None}
    outcome = {}

    def validate() -> None:
        report, frame = validate_dataset(args.dataset, args.suite, parameters, args.context_root)
        out = Path(args.report_dir)
        report.write(out / "report.json")
        frame.to_csv(out / "metadata.csv", index=False)
        print(report.summary())
        if report.data_docs:
            print(f"Data Docs (this run is the newest of suite {report.suite}): {report.data_docs}")
        outcome["success"] = report.success

    # A dataset that cannot be validated is the user's error (2); one that fails its suite is 1.
    code = run_command("validate", validate)
    return code or (0 if outcome["success"] else 1)


if __name__ == "__main__":
    sys.exit(main())
