"""Entry point ``evaluate``: score a registered backbone for side-by-side comparison in the UI.

Fits the same probes as ``heads`` on ``<data>/train`` and logs their val metrics (see
``projects.evaluation``), a confusion-matrix and an embedding plot. The metrics are also written
on the model version as ``vf.eval.<metric>`` tags: the promotion gate compares them with the
current holder of the alias.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import mlflow
from mlflow import MlflowClient

from projects.evaluation import evaluate, plot_confusion, plot_embeddings
from projects.heads import add_probe_arguments, parse_probe_args
from projects.tracking import log_training_data, run_entry_point, training_data
from registry.lineage import EVAL_PREFIX, resolve_version, version_uri


def run(model_uri: str, args: argparse.Namespace, knn_k: int) -> dict[str, float]:
    client = MlflowClient()
    mv = resolve_version(client, model_uri)
    uri = version_uri(mv)
    dataset = training_data(args.data, args.validation_report)
    with mlflow.start_run() as active:
        mlflow.log_params({"evaluated_model": uri, "data.path": dataset.version.path, "eval.knn_k": knn_k,
                           "eval.masks": args.masks, "eval.targets": args.targets,
                           "eval.target_column": args.target_column})
        mlflow.set_tags({"vf.entry_point": "evaluate", "vf.evaluated_model": uri})
        log_training_data(dataset, context="evaluation")
        embedder = mlflow.pyfunc.load_model(uri).unwrap_python_model().embedder
        result = evaluate(embedder, dataset.path, knn_k, args.masks or None, args.targets or None, args.target_column)
        mlflow.log_metrics(result.metrics)
        with TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(plot_confusion(result, Path(tmp) / "confusion_matrix.png")), "plots")
            mlflow.log_artifact(str(plot_embeddings(result, Path(tmp) / "embeddings_pca.png")), "plots")
        for key, value in result.metrics.items():
            client.set_model_version_tag(mv.name, mv.version, f"{EVAL_PREFIX}{key}", repr(value))
        client.set_model_version_tag(mv.name, mv.version, f"{EVAL_PREFIX}run_id", active.info.run_id)
    print(f"{uri}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items()))
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="backbone: models:/<name>/<version|latest> or models:/<name>@<alias>")
    add_probe_arguments(parser)
    args, knn_k = parse_probe_args(parser, argv)
    return run_entry_point("evaluate", lambda: run(args.model, args, knn_k))


if __name__ == "__main__":
    sys.exit(main())
