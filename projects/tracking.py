"""MLflow glue shared by the entry points: training data with its version and validation, params."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from data.annotations import proposed_by_of
from data.report import ValidationReport
from data.tiling import tiling_of
from data.versioning import DatasetVersion, dataset_version, find_repo_root
from dinomx.errors import UserError, one_line, run_command
from dinomx.online_eval import learning_verdict, verdict_sentence
from dinomx.shards import is_sharded, read_index
from registry.lineage import Lineage, code_version
from registry.mlflow_service import MlflowService, Outcome, Tag

VALIDATION_ARTIFACT_DIR = "data_validation"


class DataNotValidatedError(UserError, RuntimeError):
    """The data has no passing validation report; nothing trains on it."""


@dataclass(frozen=True)
class TrainingData:
    path: Path
    version: DatasetVersion
    report: ValidationReport
    report_path: Path

    @cached_property
    def shards(self) -> str:
        """"N shards, M tiles" of a split of shards; empty for an image folder (the index is read
        once, however many tags and lineage fields name it)."""
        if not is_sharded(self.path):
            return ""
        index = read_index(self.path)
        return f"{len(index.shards)} shards, {index.samples} tiles"


def training_data(path: str | Path, report_path: str | Path, skip_gate: bool = False) -> TrainingData:
    """Resolve ``path`` to its DVC version and refuse it unless its validation report passed, or
    ``skip_gate`` says to train anyway (``log_training_data`` records it, and the promotion gate
    still refuses a model of such data)."""
    path, report_path = Path(path), Path(report_path)
    version = dataset_version(path)
    if not report_path.is_file():
        raise DataNotValidatedError(
            f"{report_path}: validation report not found; run `dvc repro` (stage validate) before training on {path}"
        )
    report = ValidationReport.read(report_path)
    covered = Path(report.dataset)
    covered = covered if covered.is_absolute() else find_repo_root(report_path.resolve()) / covered
    if covered != path.resolve() and covered not in path.resolve().parents:
        raise DataNotValidatedError(f"{report_path}: reports on {report.dataset}, which does not contain {path}")
    if not report.success:
        if not skip_gate:
            raise DataNotValidatedError(f"{path} failed validation; nothing trains on it (--skip-validation-gate "
                                        f"yes trains anyway, and its models cannot be promoted):\n{report.summary()}")
        logging.getLogger(__name__).warning("validation gate skipped: training on %s, which failed %s",
                                            path, report.suite)
    return TrainingData(path=path, version=version, report=report, report_path=report_path)


def dataset_source(source: str):
    """MLflow's dataset source of a local path or URL."""
    with warnings.catch_warnings():
        # A local path matches both of MLflow's local source types, which are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return resolve_dataset_source(source)


def log_training_data(data: TrainingData, context: str) -> str:
    """Log the dataset as a run input (DVC md5 as digest) and its validation report; returns
    the report's artifact URI."""
    source = data.version.remote_url or str(Path(data.version.repo_root) / data.version.tracked_path)
    dataset = MetaDataset(source=dataset_source(source), name=data.version.path, digest=data.version.digest)
    shards = {Tag.DATA_SHARDS: data.shards} if data.shards else {}
    mlflow.log_input(
        dataset,
        context=context,
        tags={Tag.DVC_MD5: data.version.md5, Tag.DVC_SOURCE: data.version.source, Tag.DVC_PATH: data.version.tracked_path,
              **shards},
    )
    mlflow.log_artifact(str(data.report_path), VALIDATION_ARTIFACT_DIR)
    mlflow.set_tags({
        Tag.DATA_PATH: data.version.path,
        Tag.DATA_MD5: data.version.md5,
        Tag.VALIDATION_SUITE: data.report.suite,
        Tag.VALIDATION_SUCCESS: str(data.report.success).lower(),
        Tag.VALIDATION_GATE: "passed" if data.report.success else "skipped",
        **({Tag.DATA_INPUTS: data.report.inputs_line()} if data.report.ingest else {}),
        **shards,
    })
    return f"{mlflow.get_artifact_uri(VALIDATION_ARTIFACT_DIR)}/{data.report_path.name}"


def project_code_version() -> tuple[str, bool]:
    """(git commit, dirty) of the checkout these entry points run from."""
    return code_version(Path(__file__).resolve().parents[1])


def build_lineage(kind: str, parent: str, data: TrainingData, report_uri: str, config_sha256: str,
                  code: tuple[str, bool], teachers: str = "", image: str = "") -> Lineage:
    """The lineage of a model made in the active run from ``data`` with ``code`` (commit, dirty);
    ``image``: the shard component it trained on, where not the index's."""
    commit, dirty = code
    tiling = tiling_of(data.path, image)
    return Lineage(
        kind=kind,
        source_run_id=mlflow.active_run().info.run_id,
        parent=parent,
        data_path=data.version.path,
        data_md5=data.version.md5,
        data_source=data.version.source,
        data_remote=data.version.remote_url or "",
        validation_suite=data.report.suite,
        validation_success=data.report.success,
        validation_report=report_uri,
        git_commit=commit,
        git_dirty=dirty,
        config_sha256=config_sha256,
        teachers=teachers,
        data_inputs=data.report.inputs_line(),
        data_shards=data.shards,
        tiling=tiling.to_json() if tiling else "",
        annotations_proposed_by=proposed_by_of(data.path),
        data_output=data.version.tracked_path,
        validation_dataset=data.report.dataset,
        validation_parameters=json.dumps(data.report.parameters, sort_keys=True),
    )


def record_learning(run_id: str, description: str) -> str:
    """The run's learning verdict from its online kNN curve (step 0 is the network before any
    update): tags the UI reads, a line in the run's description, and the sentence a console prints."""
    client = MlflowService().client
    history = sorted(client.get_metric_history(run_id, "knn_top1"), key=lambda m: m.step)
    if len(history) < 2 or history[0].step != 0:
        return "learning not measured: no online kNN (an eval split and train.eval_every > 0 give one)"
    learned, verdict = learning_verdict(history[0].value, history[-1].value)
    mlflow.set_tags({Tag.LEARNING: verdict, Tag.LEARNED: str(learned).lower(),
                     Tag.NOTE: f"{description}\n\n**{'Learned' if learned else 'Did not learn'}:** {verdict}"})
    return verdict_sentence(history[0].value, history[-1].value)


def family_experiment(family: str) -> str | None:
    """The id of the experiment a run of ``family`` opens in: the family's own (all its runs side
    by side), unless a launcher (``mlflow run --experiment-name``, the portal, a Slurm job) chose
    one, which None leaves to it."""
    if any(os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")):
        return None
    return MlflowService().experiment_id(family)


def mark_model_training(family: str) -> None:
    """The active run's experiment opens in MLflow's model-training view, not the GenAI one; a run
    that a bare ``mlflow run`` put in MLflow's Default experiment says how to keep it with its family."""
    client, experiment_id = MlflowService().client, mlflow.active_run().info.experiment_id
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(Tag.EXPERIMENT_KIND) is None:
        client.set_experiment_tag(experiment_id, Tag.EXPERIMENT_KIND, "custom_model_development")
    if experiment.name == "Default":
        print(f"note: this run is in MLflow's Default experiment, away from the runs of {family!r}; "
              f"mlflow run --experiment-name {family} keeps it beside them", file=sys.stderr)


def metric_key(name: str) -> str:
    """``name`` as MLflow takes a metric key (letters, digits, ``_ - . / ``space): a category such as
    ``>400`` keeps its meaning (``gt400``) rather than being refused."""
    name = name.replace(">=", "ge").replace("<=", "le").replace(">", "gt").replace("<", "lt")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_flat_params(params: dict) -> None:
    mlflow.log_params({key: _param_value(value) for key, value in params.items()})


def _param_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def whole_number(text: str) -> int:
    """An argparse type: MLflow passes numeric parameters as floats ("2.0")."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(value)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "urllib3", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunDeleted(UserError):
    """The MLflow run an entry point logs to was deleted (or its experiment) while it ran."""

    def __init__(self, run_id: str, what: str):
        super().__init__(f"MLflow run {run_id}: {what}; nothing more can be logged to it")


def run_entry_point(prog: str, call: Callable[[], object]) -> int:
    """``call()`` as an entry point's command: a user's error (or the registry's "no such
    model") is one line and exit 2, and the MLflow run it happened in ends FAILED with the
    message as its note, so the UI says why."""
    # The run a launcher (``mlflow run``, the portal, Slurm) opened, and ends once this command
    # exits; read now, as MLflow unsets the variable when the run is first ended.
    launcher = os.environ.get("MLFLOW_RUN_ID")

    def watched() -> None:
        try:
            call()
        except MlflowException as exc:
            # The store's own words ("must be in the 'active' state") do not say who did what.
            run_id = _current_run_id(launcher)
            if run_id and (what := MlflowService().deletion(run_id, launched=run_id == launcher)):
                raise RunDeleted(run_id, what) from exc
            raise
    return run_command(prog, watched, also=(MlflowException,), on_error=lambda exc: fail_run(exc, launcher))


def _current_run_id(launcher: str | None) -> str | None:
    """The run an entry point's error happened in: open, or the last one it ended, or the
    launcher's."""
    active = mlflow.active_run()
    last = None if active else mlflow.last_active_run()
    return (active or last).info.run_id if (active or last) else launcher


def fail_run(exc: BaseException, launcher: str | None) -> None:
    """The run an entry point's error happened in ends FAILED with the error as its reason."""
    run_id = _current_run_id(launcher)
    if not run_id:
        return
    try:
        if isinstance(exc, RunDeleted):
            MlflowService().finish_deleted(run_id, Outcome.FAILED, one_line(exc), launched=run_id == launcher)
        else:
            MlflowService().finish(run_id, Outcome.FAILED, one_line(exc))
    except MlflowException as unreachable:  # the message still reaches the terminal
        logging.getLogger(__name__).warning("could not mark run %s FAILED: %s", run_id, unreachable)
