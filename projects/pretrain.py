"""Entry point ``pretrain``: DINO-MX self-supervised pretraining, tracked and registered in MLflow.

    mlflow run . -e pretrain --env-manager local -P name=demo -P overrides="train.epochs=2"
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import mlflow
import numpy as np
from accelerate.utils import broadcast_object_list
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from PIL import Image

from dinomx.attention import write_attention_pngs
from dinomx.backbone import pretrained_student
from dinomx.checkpoint import CHECKPOINT_NAME
from dinomx.config import DinoMXConfig
from dinomx.data import labelled_images, split_classes
from dinomx.errors import MissingInput
from dinomx.interrupt import Interrupted, exit_code, wants_requeue
from dinomx.train import duration, make_accelerator, train
from projects.tracking import (
    VALIDATION_ARTIFACT_DIR,
    build_lineage,
    configure_logging,
    family_experiment,
    log_flat_params,
    log_training_data,
    mark_model_training,
    project_code_version,
    record_learning,
    run_entry_point,
    training_data,
    whole_number,
)
from registry.lineage import resolve_version, version_uri
from registry.mlflow_service import MAX_TAG_CHARS, MlflowService, Outcome, Tag, run_name
from registry.models import log_and_register
from registry.pyfunc import BACKBONE_ARTIFACT, BackboneModel


def backbone_signature(num_channels: int, embed_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, num_channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
    )


def example_images(data: Path, num_channels: int) -> np.ndarray:
    """Two real training images as the model's input example, (2, H, W, C) uint8."""
    arrays = [np.asarray(image) for image in labelled_images(data, num_channels, limit=2)[1]]
    return np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])


def one_image_per_class(data: Path, num_channels: int) -> list[tuple[str, Image.Image]]:
    """The first training image of each class, named by its class."""
    _, images, labels, classes = labelled_images(data, num_channels, first_of_each_class=True)
    return [(classes[label], image) for label, image in zip(labels, images)]


def resolve_teachers(cfg: DinoMXConfig) -> DinoMXConfig:
    """Registered teachers (models:/...) become the local backbone directories of their artifacts."""
    local = []
    for teacher in cfg.distillation.teachers:
        if teacher.startswith("models:/"):
            version = resolve_version(MlflowService().client, teacher)
            root = Path(mlflow.artifacts.download_artifacts(version_uri(version)))
            teacher = str(root / "artifacts" / BACKBONE_ARTIFACT)
        local.append(teacher)
    return cfg.replace(distillation=cfg.distillation.replace(teachers=local))


def eval_split(data: str, eval_data: str) -> Path | None:
    """The labelled split for online kNN: as given, else the ``val`` beside a ``train`` folder."""
    if eval_data:
        if not Path(eval_data).is_dir():
            raise MissingInput(f"eval_data: {eval_data} is not a directory (expected <root>/<class>/<image>, or a "
                               "split of shards)")
        return Path(eval_data)
    sibling = Path(data).parent / "val"
    if Path(data).name != "train" or not sibling.is_dir():
        return None
    train_classes, val_classes = set(split_classes(data)), set(split_classes(sibling))
    if len(train_classes) < 2 or not val_classes <= train_classes:
        logging.getLogger(__name__).warning("no online kNN: %s is not labelled like %s (class folders)", sibling, data)
        return None
    return sibling


RUN_RECORD = "mlflow_run.json"


def checkpoint_run(resume_from: str) -> str | None:
    """The MLflow run that wrote the checkpoint at ``resume_from`` (a file or its directory)."""
    source = Path(resume_from)
    record = (source if source.is_dir() else source.parent) / RUN_RECORD
    return json.loads(record.read_text())["run_id"] if record.is_file() else None


def run(config: str, data: str, validation_report: str, name: str, overrides: list[str], resume_from: str = "",
        eval_data: str = "", skip_validation_gate: bool = False):
    """Train and register, on this process or as rank 0 of several (``torchrun``, or ``srun`` under
    the slurm backend). Only rank 0 talks to MLflow.

    A run continues where it was stopped: given ``resume_from``, in the MLflow run that wrote the
    checkpoint; given a run that already trained (``MLFLOW_RUN_ID`` of a requeued Slurm job, or
    ``mlflow run --run-id``), from that run's own latest checkpoint. Either way its metric history
    goes on in the same run and its lineage is unchanged.
    """
    # The sizes of a pretrained backbone are logged and registered as it has them.
    cfg = pretrained_student(DinoMXConfig.from_yaml(config, overrides))
    dataset = training_data(data, validation_report, skip_gate=skip_validation_gate)
    eval_root = eval_split(data, eval_data) if cfg.train.eval_every else None
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:
        run_id, resume = broadcast_object_list([None, None])
        try:
            train(_run_config(cfg, run_id), dataset.path, accelerator=accelerator, resume_from=resume, eval_root=eval_root)
        except Interrupted:
            accelerator.wait_for_everyone()
            raise
        # A process that ends first makes srun end the others: wait for rank 0's registration.
        accelerator.wait_for_everyone()
        return None

    commit, dirty = project_code_version()
    owner = checkpoint_run(resume_from) if resume_from else None
    entry_point = "distill" if cfg.distillation.teachers else "pretrain"
    teachers = f" distilled from {', '.join(cfg.distillation.teachers)}" if cfg.distillation.teachers else ""
    description = (f"DINO-MX {entry_point} of `{name}-backbone` ({cfg.student.arch}, {cfg.student.num_hidden_layers} "
                   f"blocks of {cfg.student.hidden_size}, from `{cfg.student.pretrained}`){teachers} on "
                   f"`{dataset.version.path}` (DVC md5 `{dataset.version.md5}`, {dataset.report.suite} "
                   f"{'passed' if dataset.report.success else 'FAILED: validation gate skipped'}). "
                   "Read `knn_top1`, `teacher_entropy` and `prototypes_in_use` to see whether it learns.")
    # Training runs log CPU, memory (and GPU, with nvidia-ml-py installed) as system metrics.
    experiment = family_experiment(name) if owner is None else None
    with MlflowService().start_or_continue(owner, experiment_id=experiment, run_name=run_name(name, entry_point),
                                           description=description,
                                           log_system_metrics=True) as (active, continuing):
        run_id = active.info.run_id
        mark_model_training(name)
        run_cfg = _run_config(cfg, run_id)
        output_dir = Path(run_cfg.train.output_dir)
        if not resume_from and continuing and (output_dir / CHECKPOINT_NAME).is_file():
            resume_from = str(output_dir)
        broadcast_object_list([run_id, resume_from or None])
        if continuing:
            report_uri = f"{mlflow.get_artifact_uri(VALIDATION_ARTIFACT_DIR)}/{dataset.report_path.name}"
        else:
            log_flat_params(cfg.flat())
            mlflow.log_params({"data.path": dataset.version.path, "data.eval_path": str(eval_root or ""),
                               "model_name": name})
            mlflow.set_tags({Tag.ENTRY_POINT: entry_point, Tag.CONFIG_SHA256: cfg.sha256(),
                             Tag.GIT_COMMIT: commit, Tag.GIT_DIRTY: str(dirty).lower()})
            mlflow.log_dict(cfg.to_dict(), "config.yaml")
            report_uri = log_training_data(dataset, context="training")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_RECORD).write_text(json.dumps({"run_id": run_id, "experiment_id": active.info.experiment_id}))
        if resume_from:
            mlflow.set_tag(Tag.RESUMED_FROM, resume_from)
        try:
            result = train(
                run_cfg,
                dataset.path,
                on_log=lambda step, metrics: _report(step, run_cfg.total_steps, metrics),
                accelerator=accelerator,
                resume_from=resume_from or None,
                eval_root=eval_root,
                # The tag is what promotion gates and the UI's run list can filter on.
                on_collapse=lambda step, reason: mlflow.set_tags({Tag.COLLAPSE: reason, Tag.COLLAPSE_STEP: str(step)}),
            )
        except Interrupted as exc:
            mlflow.set_tags({Tag.INTERRUPTED: str(exc), Tag.CHECKPOINT: str(exc.checkpoint)})
            # A preempted job that Slurm requeues reopens this KILLED run at its next start.
            MlflowService().finish(run_id, Outcome.REQUEUED if wants_requeue(exc) else Outcome.KILLED)
            accelerator.wait_for_everyone()
            raise
        except Exception as exc:  # a bug's run says what broke too, not only its log
            mlflow.set_tag(Tag.ERROR, str(exc)[:MAX_TAG_CHARS])
            raise
        verdict = record_learning(run_id, description)
        mlflow.log_artifact(str(result.checkpoint), "checkpoint")
        with TemporaryDirectory() as tmp:
            write_attention_pngs(result.backbone_dir, one_image_per_class(dataset.path, cfg.student.num_channels), tmp)
            mlflow.log_artifacts(tmp, "attention")

        lineage = build_lineage("backbone", cfg.student.pretrained, dataset, report_uri, cfg.sha256(),
                                (commit, dirty), teachers=",".join(cfg.distillation.teachers),
                                image=cfg.dataset.shard_image)
        version = log_and_register(
            f"{name}-backbone",
            BackboneModel(),
            {BACKBONE_ARTIFACT: str(result.backbone_dir)},
            lineage,
            backbone_signature(cfg.student.num_channels, cfg.student.hidden_size),
            example_images(dataset.path, cfg.student.num_channels),
        )
    print(f"registered models:/{version.name}/{version.version} from run {run_id}")
    print(verdict)
    accelerator.wait_for_everyone()
    return version


def _report(step: int, total: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=step)
    left = f" ({duration(metrics['seconds_left'])} left)" if "seconds_left" in metrics else ""
    mlflow.set_tag(Tag.PROGRESS, f"{step}/{total}{left}")


def _run_config(cfg: DinoMXConfig, run_id: str) -> DinoMXConfig:
    """Registered teachers resolved locally, outputs in the run's own folder (where its resumable
    checkpoint is found again)."""
    return resolve_teachers(cfg).replace(train=cfg.train.replace(output_dir=str(Path(cfg.train.output_dir) / run_id)))


def launch_workers(processes: int, argv: list[str]) -> int | None:
    """``processes`` > 1 on this machine: this command again under ``torchrun``, one per process.
    None when it is one process, or already one of several (a scheduler launched it)."""
    if processes <= 1 or "RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "projects.pretrain", *argv]
    return subprocess.run(command).returncode


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
    parser.add_argument("--skip-validation-gate", choices=("yes", "no"), default="no",
                        help="yes: train although the data failed validation (recorded as data.validation.gate=skipped; "
                             "its models cannot be promoted)")
    parser.add_argument("--processes", type=whole_number, default=1, help="training processes on this machine (DDP/FSDP "
                        "through torchrun); under the slurm backend its config's tasks decide")
    args = parser.parse_args(argv)
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    if (code := launch_workers(args.processes, _without_processes(argv))) is not None:
        return code
    def pretrain() -> None:
        overrides = shlex.split(args.overrides)
        if args.teachers:
            teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
            overrides.append(f"distillation.teachers={json.dumps(teachers)}")
        run(args.config, args.data, args.validation_report, args.name, overrides, args.resume_from, args.eval_data,
            args.skip_validation_gate == "yes")

    try:
        return run_entry_point("distill" if args.teachers else "pretrain", pretrain)
    except Interrupted as exc:
        print(f"pretrain: interrupted by {exc}", file=sys.stderr)
        return exit_code(exc)


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
