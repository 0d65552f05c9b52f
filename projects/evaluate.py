"""Entry point ``evaluate``: score a registered backbone for side-by-side comparison in the UI.

Fits the same probes as ``heads`` on ``<data>/train`` and logs their val metrics (see
``dinomx.evaluation``), a confusion-matrix and an embedding plot. The metrics are also written
on the model version as ``vf.eval.<metric>`` tags: the promotion gate compares them with the
current holder of the alias.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import mlflow
from PIL import Image

from dinomx.evaluation import evaluate, plot_confusion, plot_embeddings, random_init_knn
from projects.probe_options import add_probe_arguments, parse_probe_args
from projects.tracking import family_experiment, log_training_data, mark_model_training, run_entry_point, training_data
from registry import audit
from registry.lineage import describe_version, resolve_version, version_uri
from registry.mlflow_service import EVAL_PREFIX, EVAL_RUN_ID, MlflowService, Tag, family_of, run_name


def run(model_uri: str, args: argparse.Namespace, knn_k: int) -> dict[str, float]:
    client = MlflowService().client
    mv = resolve_version(client, model_uri)
    uri = version_uri(mv)
    dataset = training_data(args.data, args.validation_report)
    description = (f"Evaluates {uri} on `{dataset.version.path}` (DVC md5 `{dataset.version.md5}`): linear and "
                   f"kNN probes, clustering{', segmentation' if args.masks else ''}"
                   f"{', regression' if args.targets else ''}, and kNN of the same architecture at random init "
                   "(`random_init.knn.*`, the promotion floor). The metrics become the version's `vf.eval.*` tags.")
    with mlflow.start_run(experiment_id=family_experiment(family_of(mv.name)), description=description,
                          run_name=run_name(family_of(mv.name), f"v{mv.version}-evaluate")) as active:
        mark_model_training()
        mlflow.log_params({"evaluated_model": uri, "data.path": dataset.version.path, "eval.knn_k": knn_k,
                           "eval.masks": args.masks, "eval.targets": args.targets,
                           "eval.target_column": args.target_column})
        mlflow.set_tags({Tag.ENTRY_POINT: "evaluate", Tag.EVALUATED_MODEL: uri})
        log_training_data(dataset, context="evaluation")
        embedder = mlflow.pyfunc.load_model(uri).unwrap_python_model().embedder
        result = evaluate(embedder, dataset.path, knn_k, args.masks or None, args.targets or None, args.target_column)
        result.metrics.update(random_init_knn(embedder, dataset.path, knn_k))
        mlflow.log_metrics(result.metrics)
        with TemporaryDirectory() as tmp:
            for plot in (plot_confusion(result, Path(tmp) / "confusion_matrix.png"),
                         plot_embeddings(result, Path(tmp) / "embeddings_pca.png")):
                mlflow.log_artifact(str(plot), "plots")
                # Also as an image of the run: the UI shows those on the run page, beside the metrics.
                with Image.open(plot) as picture:
                    mlflow.log_image(picture.convert("RGB"), key=plot.stem, step=0)
        for key, value in result.metrics.items():
            client.set_model_version_tag(mv.name, mv.version, f"{EVAL_PREFIX}{key}", repr(value))
        client.set_model_version_tag(mv.name, mv.version, EVAL_RUN_ID, active.info.run_id)
        evaluated = client.get_model_version(mv.name, mv.version)
        describe_version(client, evaluated, audit.version_history(client, evaluated))
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
