"""Entry point ``evaluate``: score a registered backbone or head for side-by-side comparison in the UI.

A backbone: fits the same probes as ``heads`` on ``<data>/train`` and logs their val metrics (see
``dinomx.evaluation``), a confusion-matrix and an embedding plot, and writes them on the model
version as ``vf.eval.<metric>`` tags for the UI. A head: its own default classifier scored on
``<data>/val`` through the backbone it was fitted on (``head.*``). A researcher's evaluation is
information; the promotion service runs this same entry point itself (``registry.evidence``) and
only what it ran and recorded in its ledger is evidence.

The paper's protocol on top (``-P folds=K``, ``-P test=<split>``): grouped k-fold
cross-validation over train and val together, no patient, case or slide in two folds (``fold.*``
per fold, ``cv.*.mean`` / ``cv.*.sd``), and external test sets fitted on this data and scored on
another (``test.<set>.*``), each set with per-category sensitivity, specificity, PPV, NPV, F1,
accuracy and Cohen's kappa (quadratic-weighted for ordered ``-P categories``). The version's
description shows them as the paper's Table 3.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from PIL import Image

from data.groups import GROUPINGS, groups_of
from dinomx.drift import Reference
from dinomx.errors import MissingInput
from dinomx.evaluation import (
    cross_validate,
    evaluate,
    external,
    plot_confusion,
    plot_embeddings,
    random_init_knn,
    score_heads,
)
from projects.probe_options import add_probe_arguments, parse_probe_args
from projects.table3 import markdown, table3, text
from projects.tracking import (
    TrainingData,
    dataset_source,
    family_experiment,
    log_training_data,
    mark_model_training,
    metric_key,
    run_entry_point,
    training_data,
)
from registry import audit
from registry.lineage import Lineage, describe_version, resolve_version, version_uri
from registry.mlflow_service import (
    EVAL_PREFIX,
    EVAL_RUN_ID,
    MAX_TAG_CHARS,
    MlflowService,
    Tag,
    family_of,
    run_name,
    version_metrics,
)

# Where an evaluation run keeps the drift watch's reference of the backbone.
REFERENCE_DIR, REFERENCE_FILE = "monitoring", "reference.npz"


def validation_report_of(split: Path) -> Path:
    """The validation report of the dataset holding ``split``: ``validation/report.json`` beside
    one of its folders (``data/<name>/validation`` of ``data/<name>/tiles/...``)."""
    for folder in [split, *split.resolve().parents][:6]:
        if (folder / "validation" / "report.json").is_file():
            return folder / "validation" / "report.json"
    raise MissingInput(f"test: {split} has no validation report above it (validation/report.json); run `dvc repro` "
                       "for that dataset, as for any data a model is scored on")


def _test_sets(spec: str) -> list[Path]:
    return [Path(part.strip()) for part in spec.split(",") if part.strip()]


def run(model_uri: str, args: argparse.Namespace, knn_k: int) -> dict[str, float]:
    client = MlflowService().client
    mv = resolve_version(client, model_uri)
    dataset = training_data(args.data, args.validation_report)
    if Lineage.from_tags(mv.tags).kind == "head":
        metrics, reference = run_head(mv, dataset), None
    else:
        metrics, reference = run_backbone(client, mv, dataset, args, knn_k)
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps({
            "model": version_uri(mv), "run_id": mlflow.last_active_run().info.run_id, "data": dataset.version.path,
            "data_md5": dataset.version.md5, "metrics": metrics, "reference": reference}))
    return metrics


def log_reference(result, uri: str, dataset: TrainingData) -> dict[str, str]:
    """What the service's drift watch compares served images with (``dinomx.drift``): the PCA of
    this split's train embeddings and a sample of its val ones, an artifact of the active run;
    its URI and SHA-256, which the promotion service records with its evaluation."""
    reference = Reference.fit(result.train.embeddings, result.val.embeddings,
                              about={"backbone": uri, "data": dataset.version.path, "data_md5": dataset.version.md5})
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / REFERENCE_FILE
        sha256 = reference.save(path)
        mlflow.log_artifact(str(path), REFERENCE_DIR)
    mlflow.log_params({"monitoring.reference_points": len(reference.points), "monitoring.components":
                       reference.components.shape[0], "monitoring.k": reference.k})
    return {"uri": f"{mlflow.get_artifact_uri(REFERENCE_DIR)}/{REFERENCE_FILE}", "sha256": sha256}


def run_head(mv, dataset: TrainingData) -> dict[str, float]:
    """A head scored on ``<data>/val`` through the backbone it was fitted on (``head.*``)."""
    uri, parent = version_uri(mv), Lineage.from_tags(mv.tags).parent
    with mlflow.start_run(experiment_id=family_experiment(family_of(mv.name)),
                          run_name=run_name(family_of(mv.name), f"head-v{mv.version}-evaluate"),
                          description=f"Scores {uri} (on {parent}) on `{dataset.version.path}/val` "
                                      f"(DVC md5 `{dataset.version.md5}`): its default classifier's `head.*` metrics."):
        mark_model_training(family_of(mv.name))
        mlflow.log_params({"evaluated_model": uri, "data.path": dataset.version.path, "backbone": parent})
        mlflow.set_tags({Tag.ENTRY_POINT: "evaluate", Tag.EVALUATED_MODEL: uri})
        log_training_data(dataset, context="evaluation")
        embedder = mlflow.pyfunc.load_model(parent).unwrap_python_model().embedder
        heads = mlflow.pyfunc.load_model(uri).unwrap_python_model().heads
        metrics = score_heads(embedder, heads, dataset.path)
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
    print(f"{uri} on {dataset.version.path}/val: accuracy {metrics['head.accuracy']:.3f}, "
          f"macro F1 {metrics['head.f1_macro']:.3f}")
    return metrics


def run_backbone(client, mv, dataset: TrainingData, args: argparse.Namespace,
                 knn_k: int) -> tuple[dict[str, float], dict[str, str]]:
    """The backbone's metrics, and its drift reference (``log_reference``)."""
    uri = version_uri(mv)
    order = [c.strip() for c in args.categories.split(",") if c.strip()] or None
    tests = [training_data(path, validation_report_of(path)) for path in _test_sets(args.test)]
    description = (f"Evaluates {uri} on `{dataset.version.path}` (DVC md5 `{dataset.version.md5}`): linear and "
                   f"kNN probes, clustering{', segmentation' if args.masks else ''}"
                   f"{', regression' if args.targets else ''}, and kNN of the same architecture at random init "
                   "(`random_init.knn.*`, the baseline of the learning verdict)"
                   + (f"; {args.folds}-fold cross-validation grouped by {args.group or 'patient'}" if args.folds else "")
                   + ("; external test sets " + ", ".join(f"`{t.version.path}`" for t in tests) if tests else "")
                   + ". "
                   "The metrics become the version's `vf.eval.*` tags; per category, its description's table.")
    with mlflow.start_run(experiment_id=family_experiment(family_of(mv.name)), description=description,
                          run_name=run_name(family_of(mv.name), f"v{mv.version}-evaluate")) as active:
        mark_model_training(family_of(mv.name))
        mlflow.log_params({"evaluated_model": uri, "data.path": dataset.version.path, "eval.knn_k": knn_k,
                           "eval.masks": args.masks, "eval.targets": args.targets,
                           "eval.target_column": args.target_column, "eval.folds": args.folds,
                           "eval.categories": args.categories, "eval.test": args.test})
        mlflow.set_tags({Tag.ENTRY_POINT: "evaluate", Tag.EVALUATED_MODEL: uri})
        log_training_data(dataset, context="evaluation")
        embedder = mlflow.pyfunc.load_model(uri).unwrap_python_model().embedder
        result = evaluate(embedder, dataset.path, knn_k, args.masks or None, args.targets or None, args.target_column,
                          order)
        result.metrics.update(random_init_knn(embedder, dataset.path, knn_k))
        reference = log_reference(result, uri, dataset)
        metrics, sets = dict(result.metrics), {"val": result.metrics}
        if args.folds:
            groups, grouping = groups_of([dataset.path / "train", dataset.path / "val"], args.group)
            folds = cross_validate(embedder, dataset.path, groups, args.folds, knn_k, args.targets or None,
                                   args.target_column, order)
            mlflow.log_params({"eval.group": grouping, "eval.groups": folds.groups})
            for index, fold in enumerate(folds.per_fold):
                mlflow.log_metrics({metric_key(f"fold.{k}"): v for k, v in fold.items()}, step=index)
            summary = folds.summary()
            metrics.update({f"cv.{k}": v for k, v in summary.items()})
            sets[f"{args.folds}-fold CV by {grouping}"] = summary
        for test in tests:
            name = validation_report_of(test.path).parent.parent.name
            mlflow.log_input(MetaDataset(dataset_source(str(test.path.resolve())), name=test.version.path,
                                         digest=test.version.digest), context="testing",
                             tags={Tag.DVC_MD5: test.version.md5, Tag.DVC_PATH: test.version.tracked_path})
            scored = external(embedder, dataset.path, test.path, knn_k, order)
            metrics.update({f"test.{name}.{k}": v for k, v in scored.items()})
            sets[f"test: {name}"] = scored
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
        rows = table3(sets, order or result.classes, order is not None)
        with TemporaryDirectory() as tmp:
            (Path(tmp) / "table3.md").write_text(markdown(rows, "Per category"))
            mlflow.log_artifact(str(Path(tmp) / "table3.md"))
            for plot in (plot_confusion(result, Path(tmp) / "confusion_matrix.png"),
                         plot_embeddings(result, Path(tmp) / "embeddings_pca.png")):
                mlflow.log_artifact(str(plot), "plots")
                # Also as an image of the run: the UI shows those on the run page, beside the metrics.
                with Image.open(plot) as picture:
                    mlflow.log_image(picture.convert("RGB"), key=plot.stem, step=0)
        if args.tag_version:
            for key, value in version_metrics(metrics).items():
                client.set_model_version_tag(mv.name, mv.version, f"{EVAL_PREFIX}{key}", repr(value))
            client.set_model_version_tag(mv.name, mv.version, EVAL_RUN_ID, active.info.run_id)
            client.set_model_version_tag(mv.name, mv.version, Tag.EVALUATION_TABLE,
                                         markdown(rows, f"Per category ({result.heads.classifier.default} probe)")[:MAX_TAG_CHARS])
            evaluated = client.get_model_version(mv.name, mv.version)
            describe_version(client, evaluated, audit.mirrored_history(evaluated))
    print(summary_text(uri, dataset.version.path, metrics, rows))
    return metrics, reference


def summary_text(uri: str, data: str, metrics: dict[str, float], rows: list[list[str]]) -> str:
    """What a person reads at the end of an evaluation; every metric is in the MLflow run."""
    knn, baseline = metrics["knn.accuracy"], metrics.get("random_init.knn.accuracy")
    lines = [f"{uri} on {data}:",
             f"  kNN {knn:.3f}" + (f" (the same model at random init {baseline:.3f}, {knn - baseline:+.3f})"
                                   if baseline is not None else "")
             + f"; linear {metrics['linear.accuracy']:.3f}"]
    extra = [f"{name} {metrics[key]:.3f}" for name, key in (("segmentation Dice", "segmentation.dice"),
                                                            ("regression r", "regression.pearson"),
                                                            ("R²", "regression.r2"), ("MAE", "regression.mae"))
             if key in metrics]
    if extra:
        lines.append("  " + ", ".join(extra))
    lines += ["", text(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="models:/<name>/<version|latest> or models:/<name>@<alias>: a backbone "
                        "(probes fitted on train, scored on val), or a head (its own classifier scored on val)")
    parser.add_argument("--metrics-out", default="", help="also write the metrics, the run and the data's DVC md5 to this "
                        "JSON file (what the promotion service records)")
    parser.add_argument("--tag-version", default="yes", choices=("yes", "no"),
                        help="write the metrics on the version as vf.eval.* tags (the promotion service's own "
                             "evaluation says no: its numbers live in its ledger, the tags stay the researcher's)")
    parser.add_argument("--folds", type=float, default=0, help="grouped k-fold cross-validation over train and val (0: off)")
    parser.add_argument("--group", default="", choices=("", *GROUPINGS),
                        help="what a fold keeps together (default: patient or case where recorded, else slide, else image)")
    parser.add_argument("--test", default="", help="external test splits, comma-separated (each with its validation report "
                        "above it): fitted on --data, scored on each alone")
    parser.add_argument("--categories", default="", help="the classes as ordered categories, lowest first "
                        "(e.g. '0-10,11-100,101-400,>400'): kappa is quadratic-weighted")
    add_probe_arguments(parser)
    args, knn_k = parse_probe_args(parser, argv)
    if args.folds < 0 or args.folds != int(args.folds) or args.folds == 1:
        parser.error(f"--folds: expected 0 (off) or a whole number of at least 2, got {args.folds:g}")
    args.folds = int(args.folds)
    args.tag_version = args.tag_version == "yes"
    return run_entry_point("evaluate", lambda: run(args.model, args, knn_k))


if __name__ == "__main__":
    sys.exit(main())
