"""Entry point ``pretrain``: DINO-MX self-supervised pretraining, tracked and registered in MLflow.

    mlflow run . -e pretrain --env-manager local -P name=demo -P overrides="train.epochs=2"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from dinomx.attention import write_attention_pngs
from dinomx.backbone import pretrained_student
from dinomx.config import ConfigError, DinoMXConfig
from dinomx.data import list_images, load_image
from dinomx.diagnostics import CollapseError
from dinomx.checkpoint import ResumeError
from dinomx.train import train
from projects.tracking import (
    DataNotValidatedError,
    build_lineage,
    configure_logging,
    log_flat_params,
    log_training_data,
    project_code_version,
    training_data,
)
from registry.lineage import resolve_version, version_uri
from registry.models import log_and_register
from registry.pyfunc import BACKBONE_ARTIFACT, BackboneModel


def backbone_signature(num_channels: int, embed_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, num_channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
    )


def one_image_per_class(paths: list[Path], labels: list[int]) -> list[Path]:
    return [paths[labels.index(label)] for label in sorted(set(labels))]


def example_images(paths: list[Path], num_channels: int) -> np.ndarray:
    """Two real training images as the model's input example, (2, H, W, C) uint8."""
    arrays = [np.asarray(load_image(p, num_channels)) for p in paths[:2]]
    return np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])


def resolve_teachers(cfg: DinoMXConfig) -> DinoMXConfig:
    """Registered teachers (models:/...) become the local backbone directories of their artifacts."""
    local = []
    for teacher in cfg.distillation.teachers:
        if teacher.startswith("models:/"):
            version = resolve_version(MlflowClient(), teacher)
            root = Path(mlflow.artifacts.download_artifacts(version_uri(version)))
            teacher = str(root / "artifacts" / BACKBONE_ARTIFACT)
        local.append(teacher)
    return dataclasses.replace(cfg, distillation=dataclasses.replace(cfg.distillation, teachers=local))


def eval_split(data: str, eval_data: str) -> Path | None:
    """The labelled split for online kNN: as given, else the ``val`` beside a ``train`` folder."""
    if eval_data:
        if not Path(eval_data).is_dir():
            raise FileNotFoundError(f"eval_data: {eval_data} is not a directory (expected <root>/<class>/<image>)")
        return Path(eval_data)
    sibling = Path(data).parent / "val"
    if Path(data).name != "train" or not sibling.is_dir():
        return None
    train_classes, val_classes = set(list_images(data)[2]), set(list_images(sibling)[2])
    if len(train_classes) < 2 or not val_classes <= train_classes:
        logging.getLogger(__name__).warning("no online kNN: %s is not labelled like %s (class folders)", sibling, data)
        return None
    return sibling


def run(config: str, data: str, validation_report: str, name: str, overrides: list[str], resume_from: str = "",
        eval_data: str = ""):
    # The sizes of a pretrained backbone are logged and registered as it has them.
    cfg = pretrained_student(DinoMXConfig.from_yaml(config, overrides))
    dataset = training_data(data, validation_report)
    eval_root = eval_split(data, eval_data) if cfg.train.eval_every else None
    commit, dirty = project_code_version()
    paths, labels, _ = list_images(dataset.path)
    with mlflow.start_run() as active:
        log_flat_params(cfg.flat())
        mlflow.log_params({"data.path": dataset.version.path, "data.eval_path": str(eval_root or ""), "model_name": name})
        entry_point = "distill" if cfg.distillation.teachers else "pretrain"
        mlflow.set_tags({"vf.entry_point": entry_point, "vf.config_sha256": cfg.sha256(),
                         "vf.git_commit": commit, "vf.git_dirty": str(dirty).lower()})
        mlflow.log_dict(cfg.to_dict(), "config.yaml")
        report_uri = log_training_data(dataset, context="training")

        run_cfg = dataclasses.replace(
            resolve_teachers(cfg),
            train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / active.info.run_id)),
        )
        if resume_from:
            mlflow.set_tag("vf.resumed_from", resume_from)
        result = train(
            run_cfg,
            dataset.path,
            on_log=lambda step, metrics: mlflow.log_metrics(metrics, step=step),
            resume_from=resume_from or None,
            eval_root=eval_root,
            # The tag is what promotion gates and the UI's run list can filter on.
            on_collapse=lambda step, reason: mlflow.set_tags({"vf.collapse": reason, "vf.collapse_step": str(step)}),
        )
        mlflow.log_artifact(str(result.checkpoint), "checkpoint")
        with TemporaryDirectory() as tmp:
            write_attention_pngs(result.backbone_dir, one_image_per_class(paths, labels), tmp)
            mlflow.log_artifacts(tmp, "attention")

        lineage = build_lineage("backbone", cfg.student.pretrained, dataset, report_uri, cfg.sha256(),
                                (commit, dirty), teachers=",".join(cfg.distillation.teachers))
        version = log_and_register(
            f"{name}-backbone",
            BackboneModel(),
            {BACKBONE_ARTIFACT: str(result.backbone_dir)},
            lineage,
            backbone_signature(cfg.student.num_channels, cfg.student.hidden_size),
            example_images(paths, cfg.student.num_channels),
        )
    print(f"registered models:/{version.name}/{version.version} from run {active.info.run_id}")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="DINO-MX YAML config")
    parser.add_argument("--data", required=True, help="image folder tracked by DVC")
    parser.add_argument("--validation-report", required=True, help="report.json of the data's validation")
    parser.add_argument("--name", required=True, help="model family; registers <name>-backbone")
    parser.add_argument("--overrides", default="", help='space-separated section.key=value, e.g. "train.epochs=2"')
    parser.add_argument("--teachers", default="", help="comma-separated frozen teachers to distil from "
                        "(models:/name/version, hf:<repo>, or directories); sets distillation.teachers")
    parser.add_argument("--resume-from", default="", help="checkpoint (or its directory) of an interrupted run with the same config")
    parser.add_argument("--eval-data", default="", help="labelled split for the online kNN of train.eval_every "
                        "(default: the val folder beside a train folder)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        overrides = shlex.split(args.overrides)
        if args.teachers:
            teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
            overrides.append(f"distillation.teachers={json.dumps(teachers)}")
        run(args.config, args.data, args.validation_report, args.name, overrides, args.resume_from, args.eval_data)
    except (ConfigError, DataNotValidatedError, ResumeError, CollapseError, LookupError, FileNotFoundError,
            MlflowException) as exc:
        print(f"pretrain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
