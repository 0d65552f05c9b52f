"""Entry point ``predict``: a registered head over whole slides or whole CT series, as an MLflow run.

    mlflow run . -e predict --env-manager local -P model=models:/demo-head@production -P input=slide.svs
    mlflow run . -e predict --env-manager local -P model=models:/calcium-head/2 -P input=s3://pacs/series7 -P score=agatston
    mlflow run . -e predict --env-manager local -P input=series.zip -P score=agatston -P region=heart.npy

The input is cut as the head's training data was (the tiling in its lineage, never asked of the
user); the outputs of ``clinical.slide`` / ``clinical.series`` become artifacts of a run in the
model's family experiment, tagged with the model version and the input's md5 and linked to the
registered model as its input, with the aggregates as metrics. ``input`` may list several slides
or series (a folder of slides, or a text file with one input per line): a cohort, one child run per
input under one parent run whose ``cohort.csv`` gathers them; under the Slurm backend each input is
a task of one job array (``projects.slurm``).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelInput
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from clinical import scores
from clinical.series import predict_series, series_summary_line
from clinical.slide import SUMMARY, predict_slide, slide_summary_line
from data.sources import cohort, fetch, unpacked
from data.tiling import Tiling
from data.wsi import SLIDE_SUFFIXES
from dinomx.errors import UserError
from dinomx.evaluation import category_metrics
from dinomx.inference import TilePredictor
from projects.table3 import markdown, table3, text
from projects.tracking import (
    configure_logging,
    dataset_source,
    family_experiment,
    mark_model_training,
    metric_key,
    run_entry_point,
    whole_number,
)
from registry.lineage import Lineage, resolve_version, version_uri
from registry.mlflow_service import MlflowService, Outcome, Tag, family_of, run_name

log = logging.getLogger(__name__)
ARTIFACTS = "prediction"
COHORT_TABLE = "cohort.csv"


class PredictError(UserError, ValueError):
    """A prediction that cannot be made as asked; the message names the parameter."""


@dataclass
class Model:
    """A registered head ready to predict: its backbone (its lineage's parent) and the tiling of
    the data it was fitted on."""

    head_uri: str
    backbone_uri: str
    tiling: Tiling
    predictor: TilePredictor
    logged_model_id: str | None

    @property
    def family(self) -> str:
        return family_of(self.head_uri.removeprefix("models:/").split("/")[0])


def load_model(uri: str, head: str = "") -> Model:
    """The head ``uri`` (a version or alias of ``<family>-head``) with its backbone and tiling."""
    client = MlflowService().client
    version = resolve_version(client, uri)
    lineage = Lineage.from_tags(version.tags)
    if lineage.kind != "head":
        raise PredictError(f"model: {version_uri(version)} is a {lineage.kind}; predict takes a head "
                           f"(models:/<family>-head/<version> or @<alias>), which names its backbone")
    if not lineage.tiling:
        raise PredictError(f"model: {version_uri(version)} has no tiling in its lineage: it was fitted on "
                           f"{lineage.data_path}, which was not cut from slides or series by data.ingest, so "
                           "there is no way to cut a new slide as its training data was")
    if not lineage.parent.startswith("models:/"):
        raise PredictError(f"model: {version_uri(version)} names no registered backbone ({lineage.parent})")
    tiling = Tiling.from_json(lineage.tiling, f"{version_uri(version)} tag vf.tiling")
    heads = mlflow.pyfunc.load_model(version_uri(version), suppress_warnings=True).unwrap_python_model().heads
    embedder = mlflow.pyfunc.load_model(lineage.parent, suppress_warnings=True).unwrap_python_model().embedder
    try:
        predictor = TilePredictor(embedder, heads, head or None)
    except KeyError as exc:
        raise PredictError(str(exc.args[0])) from None
    # The version's LoggedModel: its model_id, or (stores that do not fill it in) its models:/m-<id> source.
    logged = version.model_id or (version.source.removeprefix("models:/") if version.source.startswith("models:/m-")
                                  else None)
    return Model(version_uri(version), lineage.parent, tiling, predictor, logged)


def _series_folder(source: Path, scratch: Path) -> Path:
    return unpacked(source, scratch) if source.suffix.lower() == ".zip" else source


def _slide_file(source: Path) -> Path:
    """A slide file, or the file OpenSlide opens a folder of DICOM whole-slide images by."""
    if source.is_file():
        return source
    from data.listing import source_files
    from data.readers.dicom_slides import dicom_slides

    files, _ = source_files(source)
    slides, _, _, errors = dicom_slides([f for f in files if f.suffix.lower() == ".dcm"])
    slides += [f for f in files if f.suffix.lower() in SLIDE_SUFFIXES]
    if len(slides) != 1:
        raise PredictError(f"input: {source} holds {len(slides)} slides; give one slide (or a cohort file)"
                           + (f"; {errors[0]}" if errors else ""))
    return slides[0]


def _region(path: str) -> np.ndarray | None:
    if not path:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PredictError(f"region: {path} is not a NumPy .npy mask ({exc}); expected (rows, columns) or "
                           "(slices, rows, columns) of booleans") from None


def _metrics(summary: dict) -> dict[str, float]:
    metrics = {}
    for key in ("tiles", "tissue_area_mm2"):
        if isinstance(summary.get(key), (int, float)):
            metrics[key] = float(summary[key])
    for name, value in (summary.get("class_fractions") or {}).items():
        metrics[f"fraction.{name}"] = value
    if regression := summary.get("regression"):
        metrics.update({f"{regression['target']}.sum": regression["sum"], f"{regression['target']}.mean": regression["mean"]})
    for name, value in ((summary.get("segmentation") or {}).get("fractions") or {}).items():
        metrics[f"segmented.{name}"] = value
    if score := summary.get("score"):
        metrics.update({f"{score['name']}.total": score["total"], f"{score['name']}.lesions": score["lesions"]})
    if series := summary.get("series"):
        metrics["slices"] = series["slices"]
    return {k: float(v) for k, v in metrics.items()}


def predict_one(source: str, model: Model | None, score: str, region: str, series_uid: str, out: Path,
                batch_size: int) -> tuple[dict, str]:
    """Predict one input into ``out``: (summary, the line a person reads)."""
    with tempfile.TemporaryDirectory(prefix="vf-predict-") as scratch:
        local = fetch(source, Path(scratch))
        provenance = {"input": source, **({"model": model.head_uri, "backbone": model.backbone_uri} if model else {})}
        if model is not None and model.tiling.modality == "he":
            if score:
                raise PredictError(f"score: {score} scores CT series; {model.head_uri} predicts slides")
            slide = _slide_file(local)
            summary = predict_slide(slide, model.predictor, model.tiling, out, batch_size, provenance)
            return summary, slide_summary_line(summary)
        folder = _series_folder(local, Path(scratch))
        if not folder.is_dir():
            raise PredictError(f"input: {source} is a file; a CT series is a folder of DICOM files, an s3:// prefix or "
                               "a .zip of them")
        summary = predict_series(folder, out, model.predictor if model else None, model.tiling if model else None,
                                 score or None, _region(region), series_uid or None, batch_size, provenance)
        return summary, series_summary_line(summary)


def _log(summary: dict, out: Path, model: Model | None, source: str, artifact_path: str) -> str:
    """The outputs in ``out`` logged on the active run; returns where, for a person to open them."""
    digest = summary.get("md5") or ""
    with_model = {"model": LoggedModelInput(model.logged_model_id)} if model and model.logged_model_id else {}
    mlflow.log_input(MetaDataset(dataset_source(source if "://" in source else str(Path(source).resolve())),
                                 name=Path(source.rstrip("/")).name, digest=digest[:36]),
                     context="inference", **with_model)
    mlflow.set_tags({Tag.INPUT: source, Tag.INPUT_MD5: digest})
    mlflow.log_metrics(_metrics(summary))
    mlflow.log_artifacts(str(out), f"{artifact_path}/{out.name}")
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    return f"outputs of run {mlflow.active_run().info.run_id} under {artifact_path}/{out.name}/: {files}"


def run(args: argparse.Namespace) -> list[dict]:
    if not args.model and not args.score:
        raise PredictError("model: give a registered head (models:/<family>-head/<version> or @<alias>), or a score "
                           "for threshold-only scoring of a CT series")
    inputs = cohort(args.input)
    reference = reference_categories(args.reference, args.score, inputs) if args.reference else None
    if args.gather:
        return gather_children(inputs, reference, args)
    model = load_model(args.model, args.head) if args.model else None
    family = model.family if model else args.family
    tags = {Tag.ENTRY_POINT: "predict", **({Tag.PREDICTED_MODEL: model.head_uri, Tag.PARENT: model.backbone_uri} if model
                                              else {}), **({Tag.SCORE: args.score} if args.score else {})}
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_task is not None and len(inputs) > 1:
        return [predict_child(inputs[int(array_task)], model, tags, args)]
    description = (f"Predicts {len(inputs)} input(s) with {model.head_uri if model else 'no model (threshold only)'}"
                   f"{' and the ' + args.score + ' score' if args.score else ''}, cut as its training data was "
                   f"({model.tiling.to_json() if model else 'the series as stored'}).")
    summaries = []
    with mlflow.start_run(experiment_id=family_experiment(family), run_name=run_name(family, "predict"),
                          description=description) as parent:
        mark_model_training(family)
        mlflow.set_tags(tags)
        # Resolved values under their own keys: `mlflow run` already logged the raw parameters.
        mlflow.log_params({"predict.model": model.head_uri if model else "", "predict.input": args.input,
                           "predict.score": args.score, "predict.inputs": len(inputs),
                           **({"predict.tiling": model.tiling.to_json()} if model else {})})
        folder = Path(args.out) / parent.info.run_id
        for source in inputs:
            out = folder / Path(source.rstrip("/")).name
            if len(inputs) > 1:
                with mlflow.start_run(nested=True, experiment_id=parent.info.experiment_id,
                                      run_name=run_name(family, f"predict-{Path(source).name}")):
                    mlflow.set_tags(tags)
                    summary, line = predict_one(source, model, args.score, args.region, args.series, out, args.batch_size)
                    where = _log(summary, out, model, source, ARTIFACTS)
            else:
                summary, line = predict_one(source, model, args.score, args.region, args.series, out, args.batch_size)
                where = _log(summary, out, model, source, ARTIFACTS)
            print(f"predict {model.head_uri if model else args.score} -> {line}\n  {where}", flush=True)
            summaries.append(summary)
        if len(inputs) > 1:
            gather(summaries, folder)
        if reference is not None:
            print(agreement(summaries, reference, args.score, folder))
    return summaries


def predict_child(source: str, model: Model | None, tags: dict[str, str], args: argparse.Namespace) -> dict:
    """One input of a cohort run as a Slurm job array: a child run of the launcher's run
    (``MLFLOW_RUN_ID``), which the array's gather job ends."""
    client, parent = MlflowService().client, os.environ["MLFLOW_RUN_ID"]
    experiment = client.get_run(parent).info.experiment_id
    family = model.family if model else args.family
    child = client.create_run(experiment, run_name=run_name(family, f"predict-{Path(source).name}"),
                              tags={MLFLOW_PARENT_RUN_ID: parent, **tags})
    with mlflow.start_run(run_id=child.info.run_id):
        out = Path(args.out) / parent / Path(source.rstrip("/")).name
        summary, line = predict_one(source, model, args.score, args.region, args.series, out, args.batch_size)
        where = _log(summary, out, model, source, ARTIFACTS)
    print(f"predict {model.head_uri if model else args.score} -> {line}\n  {where}", flush=True)
    return summary


def gather_children(inputs: list[str], reference: dict[str, str] | None, args: argparse.Namespace) -> list[dict]:
    """The cohort's parent run (``MLFLOW_RUN_ID``) once its job array has ended: every input's
    summary gathered into ``cohort.csv`` (and the score against the reference); an input without a
    finished child run fails the parent, naming it."""
    client, parent = MlflowService().client, os.environ["MLFLOW_RUN_ID"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
    done = {c.data.tags.get(Tag.INPUT): c for c in children if c.info.status == "FINISHED"}
    with mlflow.start_run(run_id=parent):
        folder = Path(args.out) / parent
        for child in children:
            # An array task that was cancelled or killed could not end its own run.
            MlflowService().finish(child.info.run_id, Outcome.FAILED, "its Slurm array task ended without reporting")
        if missing := [source for source in inputs if source not in done]:
            failed = {c.data.tags.get(Tag.INPUT) or c.info.run_name: c.data.tags.get(Tag.ERROR, c.info.status)
                      for c in children if c.info.status != "FINISHED"}
            raise PredictError(f"{len(missing)} of {len(inputs)} inputs have no finished prediction, e.g. {missing[0]}"
                               + (f": {next(iter(failed.values()))}" if failed else ""))
        summaries = []
        for source in inputs:
            [summary_file] = [a.path for a in client.list_artifacts(done[source].info.run_id, ARTIFACTS)]
            local = client.download_artifacts(done[source].info.run_id, f"{summary_file}/{SUMMARY}", str(folder))
            summaries.append(json.loads(Path(local).read_text()))
        gather(summaries, folder)
        if reference is not None:
            print(agreement(summaries, reference, args.score, folder))
    return summaries


def reference_categories(path: str, score: str, inputs: list[str]) -> dict[str, str]:
    """The reference category of every input, from a CSV with columns ``input`` (as the cohort lists
    it) and ``category`` (one of the score's); checked before anything runs."""
    if not score:
        raise PredictError("reference: categories are compared with a score's; give -P score=<name> too")
    categories = scores.get(score).CATEGORIES
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PredictError(f"reference: {path} is not a readable CSV ({exc})") from None
    if not rows or not {"input", "category"} <= set(rows[0]):
        raise PredictError(f"reference: {path}: expected columns input and category, found {list(rows[0]) if rows else []}")
    found = {row["input"].strip(): row["category"].strip() for row in rows}
    for number, (source, category) in enumerate(found.items(), start=2):
        if category not in categories:
            raise PredictError(f"reference: {path} row {number}: category {category!r} of {source}; the {score} score's "
                               f"are {list(categories)}")
    if missing := [source for source in inputs if source not in found]:
        raise PredictError(f"reference: {path} has no category for {len(missing)} input(s), e.g. {missing[0]}")
    return found


def agreement(summaries: list[dict], reference: dict[str, str], score: str, folder: Path) -> str:
    """The score's category against the reference over the cohort, as the paper reports it: per
    category sensitivity, specificity, PPV, NPV, F1, accuracy, and quadratic-weighted kappa; logged on
    the parent run (``reference.*`` and ``table3.md``). Returns the table a person reads."""
    categories = list(scores.get(score).CATEGORIES)
    truth = [categories.index(reference[s["input"]]) for s in summaries]
    predicted = [categories.index(s["score"]["category"]) for s in summaries]
    metrics = {f"category.{k}": v for k, v in
               category_metrics(np.asarray(truth), np.asarray(predicted), categories, order=categories).items()}
    mlflow.log_metrics({metric_key(f"reference.{k}"): v for k, v in metrics.items()})
    rows = table3({f"{score} against reference ({len(summaries)})": metrics}, categories, weighted=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table3.md").write_text(markdown(rows, f"{score} category against the reference category"))
    mlflow.log_artifact(str(folder / "table3.md"))
    return text(rows)


def gather(summaries: list[dict], folder: Path) -> Path:
    """One row per input of a cohort, logged on the parent run."""
    rows = [{"input": s.get("input"), "md5": s.get("md5") or s.get("series", {}).get("series_uid"), **_metrics(s),
             **({"category": s["score"]["category"]} if s.get("score") else {})} for s in summaries]
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("input", "md5"), k))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / COHORT_TABLE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    mlflow.log_artifact(str(folder / COHORT_TABLE))
    return folder / COHORT_TABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="registered head: models:/<family>-head/<version> or @<alias>")
    parser.add_argument("--input", required=True, help="a slide, a CT series (folder, s3:// prefix or .zip), or a "
                        "cohort: a folder of slides or a text file with one input per line")
    parser.add_argument("--score", default="", help="score module for CT series (e.g. agatston)")
    parser.add_argument("--head", default="", help="which classifier of the head answers (default: its own)")
    parser.add_argument("--region", default="", help="threshold-only scoring: .npy mask of where to count")
    parser.add_argument("--series", default="", help="Series Instance UID, when a folder holds several")
    parser.add_argument("--reference", default="", help="cohort of series with a score: CSV of input,category "
                        "(the reference category per patient) to evaluate the score's category against")
    parser.add_argument("--family", default="scores", help="experiment of threshold-only runs (no model)")
    parser.add_argument("--batch-size", type=whole_number, default=32, help="tiles or slices per forward pass")
    parser.add_argument("--out", default="outputs/predict", help="where the outputs are written before logging")
    parser.add_argument("--gather", action="store_true", help="(the Slurm backend's last job of a cohort) gather "
                        "the children of MLFLOW_RUN_ID into its cohort table")
    args = parser.parse_args(argv)
    configure_logging()
    return run_entry_point("predict", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
