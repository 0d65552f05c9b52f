"""Validate a dataset with a Great Expectations checkpoint before anything trains on it.

The GX file context lives in ``data/gx`` of the repository holding the dataset; each run stores
its suite, checkpoint and result there and rebuilds the Data Docs site. A failing suite exits
non-zero (so ``dvc repro`` stops) and leaves a JSON report naming each failing expectation and
the files that broke it, and the path of the Data Docs site, whose newest page of the suite is
that run.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context import FileDataContext
from great_expectations.data_context.types.base import ProgressBarsConfig

from data.inputs import REFUSED, SKIPPED, SUMMARY
from data.metadata import dataset_metadata, shard_metadata
from data.parallel import units_mapper
from data.report import Failure, ValidationReport, merge_reports
from data.shards import SHARDS, Md5Memo
from data.suites import SUITES
from data.versioning import UntrackedDataError, find_repo_root
from dinomx.errors import DataError, run_command
from dinomx.shards import INDEX, read_index

logging.getLogger("great_expectations").setLevel(logging.ERROR)


def context_root(dataset: Path) -> Path:
    """``data/`` of the repository (DVC or git) holding ``dataset``, else beside the dataset."""
    for candidate in [dataset, *dataset.parents]:
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate / "data"
    return dataset.parent


def file_context(root: Path | None) -> FileDataContext:
    """The file context at ``root``; None: one in memory, without Data Docs (a shard's check)."""
    context = gx.get_context(mode="file", project_root_dir=str(root)) if root is not None else gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _checkpoint(context, suite_name: str, docs: bool = True) -> gx.Checkpoint:
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
        actions=[UpdateDataDocsAction(name="data_docs")] if docs else [],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    ))


def _check_suite(suite_name: str, parameters: dict) -> None:
    if suite_name not in SUITES:
        raise DataError(f"suite: expected one of {sorted(SUITES)}, got {suite_name!r}")
    missing = [p for p in SUITES[suite_name].parameters if p not in parameters]
    if missing:
        raise DataError(f"suite {suite_name} needs parameter(s) {missing} (--{missing[0].replace('_', '-')})")


@functools.cache
def _shard_checkpoint(suite_name: str) -> gx.Checkpoint:
    """One in-memory checkpoint of the suite per process, for every shard it checks: building it is
    a tenth of a second, as much as checking a small shard. Built before workers fork, it is
    theirs too."""
    return _checkpoint(file_context(None), suite_name, docs=False)


def validate_frame(frame: pd.DataFrame, suite_name: str, parameters: dict, dataset: str,
                   context_dir: Path | None) -> ValidationReport:
    """``context_dir`` None: an in-memory context, without Data Docs (a shard's check)."""
    _check_suite(suite_name, parameters)
    if context_dir is None:
        context, checkpoint = None, _shard_checkpoint(suite_name)
    else:
        context = file_context(context_dir)
        checkpoint = _checkpoint(context, suite_name)
    run = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
    result = next(iter(run.run_results.values()))
    docs = context.get_docs_sites_urls() if context is not None else []
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


def check_shard(task: tuple[str, str, int, str, dict]) -> dict:
    """A shard's report (one process's work; plain values cross back). A shard cut at a member
    boundary reads as a shorter tar: its sample count against the index's says so."""
    path, name, samples, suite, parameters = task
    try:
        frame = shard_metadata(Path(path), name)
    except DataError as exc:
        return ValidationReport(suite=suite, dataset=name, success=False, rows=0, evaluated_expectations=1, failures=[
            Failure(expectation="shard_is_readable", column=None, unexpected_count=1, files=[name],
                    expected="a tar of samples", observed=[str(exc).split(": ", 1)[-1]])]).to_dict()
    report = validate_frame(frame, suite, parameters, name, None)
    found = frame["path"].str.split(":").str[1].str.split(".").str[0].nunique() if len(frame) else 0
    if found != samples:
        report.success = False
        report.failures.append(Failure(expectation="shard_holds_its_indexed_samples", column=None,
                                       unexpected_count=abs(samples - found), files=[name],
                                       expected=f"{samples} samples", observed=[found]))
    return report.to_dict()


def validate_shards(root: Path, suite: str, parameters: dict, context_dir: Path, workers: int,
                    verify: bool = False) -> ValidationReport:
    """Every shard of a sharded dataset checked by itself against the suite, ``workers`` at a
    time: a shard is a slide or a series, and must pass as one (a tolerance such as "95 % of the
    tiles" holds per slide). A shard's result is kept under ``<context>/gx/uncommitted/shards/`` by its md5 and
    name, the suite and the parameters, so checking the dataset again after a slide was added
    checks only that slide's shards. Each shard's md5 is held against its index's; the md5 is
    remembered by size and modification time for ``Md5Memo``'s trust period, and ``verify``
    computes every one again."""
    _check_suite(suite, parameters)
    cache = context_dir / "gx" / "uncommitted" / "shards"
    key = hashlib.sha256(json.dumps([suite, parameters, SUITES[suite].fingerprint()], sort_keys=True).encode()).hexdigest()[:16]
    hashes = Md5Memo(cache / "md5.json", fresh=verify)
    tasks, missing, damaged = [], [], []
    for index in sorted((root / SHARDS).glob(f"*/{INDEX}")):
        for shard in read_index(index.parent).shards:
            path, name = index.parent / shard.name, f"{SHARDS}/{index.parent.name}/{shard.name}"
            if not path.is_file():
                missing.append(name)
                continue
            if (md5 := hashes.md5(path)) != shard.md5:
                damaged.append((name, shard.md5, md5))
            result = cache / f"{md5}-{hashlib.sha256(name.encode()).hexdigest()[:8]}-{key}.json"
            tasks.append((path, name, shard.samples, result))
    hashes.save()
    if not tasks and not missing:
        raise DataError(f"{root / SHARDS}: no shard index ({INDEX}) in any split folder")
    todo = [(str(path), name, samples, suite, parameters) for path, name, samples, result in tasks if not result.is_file()]
    results = {name: result for _, name, _, result in tasks}
    cache.mkdir(parents=True, exist_ok=True)
    if todo:
        _shard_checkpoint(suite)
    with units_mapper(workers, len(todo), preload=("data.validate",)) as mapper:
        for task, report in zip(todo, mapper(check_shard, todo)):
            results[task[1]].write_text(json.dumps(report))
    reports = [ValidationReport.from_dict(json.loads(result.read_text())) for result in results.values()]
    merged = merge_reports(reports, suite, repo_relative(root, root))
    if missing:
        merged.success = False
        merged.failures.append(Failure(expectation="shard_exists", column=None, unexpected_count=len(missing),
                                       files=missing, expected="every shard its index lists"))
    if damaged:
        merged.success = False
        merged.failures.append(Failure(expectation="shard_matches_its_index", column=None, unexpected_count=len(damaged),
                                       files=[name for name, _, _ in damaged],
                                       expected="the md5 its index records: " + ", ".join(md5 for _, md5, _ in damaged),
                                       observed=[md5 for _, _, md5 in damaged]))
    merged.shards = {"shards": len(tasks) + len(missing), "checked": len(todo), "cached": len(tasks) - len(todo),
                     "hashed": hashes.computed}
    return merged


def _plain(value):
    """A JSON-ready value (numpy scalars from the metadata frame are not)."""
    return value.item() if hasattr(value, "item") else value


def validate_dataset(root: str | Path, suite: str, parameters: dict, context_dir: str | Path | None = None,
                     workers: int = 0, verify: bool = False) -> tuple[ValidationReport, pd.DataFrame | None]:
    """The report, and the metadata frame it judged (None for shards, checked one by one;
    ``verify``: every shard's md5 computed, none taken from the cache)."""
    root = Path(root)
    context_dir = Path(context_dir) if context_dir else context_root(root.resolve())
    if (root / SHARDS).is_dir():
        frame = None
        report = validate_shards(root, suite, parameters, context_dir, workers or os.cpu_count() or 1, verify)
    else:
        frame = dataset_metadata(root)
        report = validate_frame(frame, suite, parameters, repo_relative(root, root), context_dir)
    report.parameters = dict(parameters)
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
    parser.add_argument("--verify", action="store_true", help="shards: compute every shard's md5 again rather than "
                        "trust one remembered by size and modification time (done anyway after a week)")
    args = parser.parse_args(argv)
    parameters = {k: v for k, v in {"tile_size": args.tile_size, "magnifications": args.magnifications,
                                     "min_tissue": args.min_tissue}.items() if v is not None}
    outcome = {}

    def validate() -> None:
        report, frame = validate_dataset(args.dataset, args.suite, parameters, args.context_root, verify=args.verify)
        out = Path(args.report_dir)
        report.write(out / "report.json")
        if frame is not None:
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
