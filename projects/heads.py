"""Entry point ``heads``: task heads on a registered backbone's frozen embeddings.

Embeds ``<data>/train`` and ``<data>/val`` with the backbone, fits a linear probe and a weighted
kNN (classification), and, when given, a linear patch-token probe on masks (segmentation) and a
ridge probe on a targets column (regression); logs their val metrics and registers
``<name>-head`` whose lineage names the backbone version it was built on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from tempfile import TemporaryDirectory

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

from dinomx.evaluation import evaluate
from projects.probe_options import add_probe_arguments, parse_probe_args
from projects.tracking import (
    build_lineage,
    family_experiment,
    log_training_data,
    mark_model_training,
    project_code_version,
    run_entry_point,
    training_data,
)
from registry.lineage import resolve_version, version_uri
from registry.mlflow_service import MlflowService, Tag, run_name
from registry.models import log_and_register
from registry.pyfunc import HEADS_ARTIFACT, HeadModel


def head_signature(embed_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "confidence")]),
        params=ParamSchema([ParamSpec("head", DataType.string, "")]),
    )


def run(backbone_uri: str, args: argparse.Namespace, knn_k: int):
    client = MlflowService().client
    backbone_version = resolve_version(client, backbone_uri)
    parent = version_uri(backbone_version)
    dataset = training_data(args.data, args.validation_report)
    code = project_code_version()
    # Resolved values under their own keys: `mlflow run` already logged the raw parameters.
    settings = {"parent_model": parent, "data.path": dataset.version.path, "head.knn_k": knn_k, "model_name": args.name,
                "head.masks": args.masks, "head.targets": args.targets, "head.target_column": args.target_column}
    description = (f"Heads (classification{', segmentation' if args.masks else ''}"
                   f"{', regression of ' + args.target_column if args.targets else ''}) on the frozen {parent}, fitted "
                   f"on `{dataset.version.path}` (DVC md5 `{dataset.version.md5}`); registers `{args.name}-head`.")
    with mlflow.start_run(experiment_id=family_experiment(args.name), run_name=run_name(args.name, "heads"),
                          description=description):
        mark_model_training(args.name)
        mlflow.log_params(settings)
        mlflow.set_tags({Tag.ENTRY_POINT: "heads", Tag.PARENT: parent, Tag.GIT_COMMIT: code[0]})
        report_uri = log_training_data(dataset, context="training")

        embedder = mlflow.pyfunc.load_model(parent).unwrap_python_model().embedder
        result = evaluate(embedder, dataset.path, knn_k, args.masks or None, args.targets or None, args.target_column)
        mlflow.log_metrics(result.metrics)
        mlflow.set_tag(Tag.DEFAULT_HEAD, result.heads.classifier.default)

        config_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        lineage = build_lineage("head", parent, dataset, report_uri, config_sha256, code)
        with TemporaryDirectory() as tmp:
            result.heads.save_pretrained(tmp)
            version = log_and_register(f"{args.name}-head", HeadModel(), {HEADS_ARTIFACT: tmp}, lineage,
                                       head_signature(embedder.dim), result.val.embeddings[:2], result.metrics)
    print(f"registered models:/{version.name}/{version.version} on {parent}: "
          + ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items()))
    return version, result.metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="", help="models:/<name>/<version|latest> or models:/<name>@<alias> "
                        "(default: the latest version of <name>-backbone)")
    parser.add_argument("--name", required=True, help="model family; registers <name>-head")
    add_probe_arguments(parser)
    args, knn_k = parse_probe_args(parser, argv)
    return run_entry_point("heads", lambda: run(args.backbone or f"models:/{args.name}-backbone/latest", args, knn_k))


if __name__ == "__main__":
    sys.exit(main())
