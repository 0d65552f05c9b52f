"""Entry point ``heads``: classification heads on a registered backbone's frozen embeddings.

Embeds ``<data>/train`` and ``<data>/val`` with the backbone, fits a linear probe and a weighted
kNN, logs their validation accuracy / macro-F1, and registers ``<name>-head`` whose lineage names
the backbone version it was built on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from tempfile import TemporaryDirectory

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from sklearn.metrics import accuracy_score, f1_score

from dinomx.classifiers import ClassifierHeads, KNNClassifier, LinearClassifier
from projects.tracking import (
    DataNotValidatedError,
    build_lineage,
    configure_logging,
    log_training_data,
    project_code_version,
    training_data,
)
from registry.lineage import resolve_version, version_uri
from registry.models import log_and_register
from registry.pyfunc import HEADS_ARTIFACT, HeadModel


def head_signature(embed_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "confidence")]),
        params=ParamSchema([ParamSpec("head", DataType.string, "")]),
    )


def fit_heads(train_x, train_y, val_x, val_y, classes: list[str], knn_k: int) -> tuple[ClassifierHeads, dict[str, float]]:
    candidates = {
        "linear": LinearClassifier(len(classes)).fit(train_x, train_y),
        "knn": KNNClassifier(len(classes), k=knn_k).fit(train_x, train_y),
    }
    metrics = {}
    for name, head in candidates.items():
        predicted = head.predict_proba(val_x).argmax(1)
        metrics[f"{name}.val_accuracy"] = float(accuracy_score(val_y, predicted))
        metrics[f"{name}.val_f1_macro"] = float(f1_score(val_y, predicted, average="macro"))
    default = max(candidates, key=lambda n: metrics[f"{n}.val_f1_macro"])
    return ClassifierHeads(classes, candidates, default, train_x.shape[1]), metrics


def run(backbone_uri: str, data: str, validation_report: str, name: str, knn_k: int):
    client = MlflowClient()
    backbone_version = resolve_version(client, backbone_uri)
    parent = version_uri(backbone_version)
    dataset = training_data(data, validation_report)
    code = project_code_version()
    # Resolved values under their own keys: `mlflow run` already logged the raw parameters.
    settings = {"parent_model": parent, "data.path": dataset.version.path, "head.knn_k": knn_k, "model_name": name}
    with mlflow.start_run() as active:
        mlflow.log_params(settings)
        mlflow.set_tags({"vf.entry_point": "heads", "vf.parent": parent, "vf.git_commit": code[0]})
        report_uri = log_training_data(dataset, context="training")

        embedder = mlflow.pyfunc.load_model(parent).unwrap_python_model().embedder
        train_x, train_y, classes = embedder.embed_folder(dataset.path / "train")
        val_x, val_y, val_classes = embedder.embed_folder(dataset.path / "val")
        if val_classes != classes:
            raise ValueError(f"{dataset.path}: val classes {val_classes} differ from train classes {classes}")
        heads, metrics = fit_heads(train_x, train_y, val_x, val_y, classes, knn_k)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("vf.default_head", heads.default)

        config_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        lineage = build_lineage("head", parent, dataset, report_uri, config_sha256, code)
        with TemporaryDirectory() as tmp:
            heads.save_pretrained(tmp)
            version = log_and_register(
                f"{name}-head", HeadModel(), {HEADS_ARTIFACT: tmp}, lineage, head_signature(embedder.dim), val_x[:2]
            )
    print(f"registered models:/{version.name}/{version.version} on {parent}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return version, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="", help="models:/<name>/<version|latest> or models:/<name>@<alias> "
                        "(default: the latest version of <name>-backbone)")
    parser.add_argument("--data", required=True, help="DVC-tracked image folder with train/ and val/ splits")
    parser.add_argument("--validation-report", required=True)
    parser.add_argument("--name", required=True, help="model family; registers <name>-head")
    parser.add_argument("--knn-k", type=float, default=20, help="neighbours of the kNN head (a whole number)")
    args = parser.parse_args(argv)
    configure_logging()
    if args.knn_k < 1 or args.knn_k != int(args.knn_k):
        parser.error(f"--knn-k: expected a positive whole number, got {args.knn_k}")
    try:
        run(args.backbone or f"models:/{args.name}-backbone/latest", args.data, args.validation_report, args.name, int(args.knn_k))
    except (DataNotValidatedError, LookupError, FileNotFoundError, ValueError, MlflowException) as exc:
        print(f"heads: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
