"""The platform's one door to MLflow: a client for a tracking URI, the names of the tags the
platform writes on runs and models, and a run's life: how it ends (finished, failed with its
reason, killed, requeued), decided here for the entry points, the Slurm backend, the local
launcher and the portal's job runner alike.

Lineage tags of a model version are the fields of ``registry.lineage.Lineage`` under
``LINEAGE_PREFIX``; everything else the platform writes is named here, so that a promotion gate,
the portal and the service read the same names the entry points wrote.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import cached_property

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

LINEAGE_PREFIX = "vf."
EVAL_PREFIX = "vf.eval."  # evaluation metrics written on a model version by `evaluate`
AUDIT_PREFIX = "vf.audit."  # one promotion or rollback record per tag on a model version
EVAL_RUN_ID = "vf.eval.run_id"  # the evaluate run that wrote them
# Longest tag value the platform writes (MLflow stores up to 8000 characters).
MAX_TAG_CHARS = 5000


# Where the service's drift watch logs a run per served backbone (serving.watch).
MONITORING_EXPERIMENT = "vf-monitoring"


class Tag:
    """Names of the tags the platform writes (besides lineage, evaluation and audit)."""

    # runs of the entry points
    ENTRY_POINT = "vf.entry_point"
    CONFIG_SHA256 = "vf.config_sha256"
    GIT_COMMIT = "vf.git_commit"
    GIT_DIRTY = "vf.git_dirty"
    PARENT = "vf.parent"
    EVALUATED_MODEL = "vf.evaluated_model"
    MONITORED_MODEL = "vf.monitored_model"  # a monitoring run: the served backbone it watches
    REFERENCE_RUN = "vf.reference_run"  # ... and the evaluation run whose drift reference it is watched against
    DEFAULT_HEAD = "vf.default_head"
    # on a model version: its evaluation per category in the paper's Table 3 layout (Markdown)
    EVALUATION_TABLE = "vf.evaluation_table"
    # runs of predict: the head that answered, what it answered about, the score computed
    PREDICTED_MODEL = "vf.predicted_model"
    INPUT = "vf.input"
    INPUT_MD5 = "vf.input_md5"
    SCORE = "vf.score"
    ERROR = "vf.error"
    NOTE = MLFLOW_RUN_NOTE  # MLflow's own: the run's description in the UI
    # MLflow's own, on experiments: which UI the experiment opens in (model training, not GenAI)
    EXPERIMENT_KIND = "mlflow.experimentKind"
    # training that stops and goes on
    PROGRESS = "vf.progress"  # "120/300 (2m10s left)", while it trains
    INTERRUPTED = "vf.interrupted"
    CHECKPOINT = "vf.checkpoint"
    RESUMED_FROM = "vf.resumed_from"
    CONTINUED_IN = "vf.continued_in"
    LEARNING = "vf.learning"  # the verdict in words: "kNN 0.46 -> 0.61 (+0.15 ...)" or "did not learn: ..."
    LEARNED = "vf.learned"  # true | false; absent when nothing measured it (no online kNN)
    COLLAPSE = "vf.collapse"
    COLLAPSE_STEP = "vf.collapse_step"
    # schedulers and the portal
    SLURM_JOB_ID = "vf.slurm.job_id"
    SLURM_ARRAY_JOB_ID = "vf.slurm.array_job_id"  # a cohort's tasks; SLURM_JOB_ID is the job that gathers them
    SLURM_STATE = "vf.slurm.state"
    SLURM_ENDED = "vf.slurm.ended"
    PORTAL_JOB = "vf.portal.job"
    PORTAL_OWNER = "vf.portal.owner"
    PORTAL_BACKEND = "vf.portal.backend"
    # the data a run read (also its dataset input's tags)
    DATA_PATH = "data.path"
    DATA_MD5 = "data.dvc_md5"
    # "N inputs: U used, S skipped, Q quarantined": what ingestion built the data from.
    DATA_INPUTS = "data.inputs"
    # "N shards, M tiles" when the data is a split of shards.
    DATA_SHARDS = "data.shards"
    VALIDATION_SUITE = "data.validation.suite"
    VALIDATION_SUCCESS = "data.validation.success"
    # "passed", or "skipped" when a run trained on data that failed (--skip-validation-gate).
    VALIDATION_GATE = "data.validation.gate"
    DVC_MD5 = "dvc.md5"
    DVC_SOURCE = "dvc.source"
    DVC_PATH = "dvc.path"
    # registered models
    KIND = "vf.kind"  # backbone | head | lock
    LOCK_OWNER = "vf.owner"
    LOCK_TOKEN = "vf.token"


def family_of(model_name: str) -> str:
    """``ct`` of ``ct-backbone`` / ``ct-head``: the family a registered model belongs to, and the
    name of the experiment where all its runs are."""
    for suffix in ("-backbone", "-head"):
        if model_name.endswith(suffix):
            return model_name[: -len(suffix)]
    return model_name


def ui_link(base: str, route: str) -> str:
    """A page of MLflow's UI at ``base`` (``experiments/3/runs/<id>``, ``models/<name>/versions/2``)
    opened on model training: the UI keeps a workflow type per browser, GenAI unless told, which
    wins over the experiment's own kind; the ``workflowType`` URL parameter wins over both."""
    return f"{base.rstrip('/')}/#/{route}?workflowType=machine_learning"


def run_name(family: str, what: str) -> str:
    """``demo-pretrain-1202-0931``: runs of one family told apart by what ran and when."""
    return f"{family}-{what}-{datetime.now():%m%d-%H%M%S}"


# Per-class metrics (``category.<class>.<measure>``): the run and the version's table hold them,
# not one version tag each.
_PER_CLASS = re.compile(r"(^|\.)category\.[^.]+\.(sensitivity|specificity|ppv|npv|f1|accuracy)(\.|$)")


def version_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a model version carries as ``vf.eval.*`` tags: all but per-fold and per-class ones."""
    return {k: v for k, v in metrics.items() if not k.startswith("fold.") and not _PER_CLASS.search(k)}


def evaluation_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The ``vf.eval.*`` metrics among a model version's tags."""
    return {k.removeprefix(EVAL_PREFIX): float(v) for k, v in tags.items() if k.startswith(EVAL_PREFIX) and k != EVAL_RUN_ID}


LIVE = (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.SCHEDULED))
ENDED = tuple(RunStatus.to_string(s) for s in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED))


class Outcome(Enum):
    """How a run's life (or one launch of it) ends, as MLflow's run status."""

    FINISHED = RunStatus.FINISHED
    FAILED = RunStatus.FAILED
    KILLED = RunStatus.KILLED
    REQUEUED = RunStatus.SCHEDULED  # stopped to go on in a later launch of the same run

    @property
    def status(self) -> str:
        return RunStatus.to_string(self.value)


@dataclass(frozen=True)
class MlflowService:
    """The tracking/registry server a part of the platform talks to (``None``: MLflow's own
    resolution, ``MLFLOW_TRACKING_URI`` first)."""

    tracking_uri: str | None = None

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    @contextmanager
    def start_or_continue(self, run_id: str | None = None, **start: object) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
        """Open the run a training goes on in: ``run_id`` (the run whose checkpoint it resumes),
        else the launcher's (``MLFLOW_RUN_ID`` of ``mlflow run`` or a requeued Slurm job) or a new
        one; ``start`` goes to ``mlflow.start_run``. A launcher's fresh run that is not the one
        continued points to it. Yields (run, whether it had already started training)."""
        launcher_run = os.environ.get("MLFLOW_RUN_ID")
        with mlflow.start_run(run_id=run_id, **start) as active:
            if launcher_run and launcher_run != active.info.run_id:
                for key, value in {Tag.CONTINUED_IN: active.info.run_id,
                                   Tag.NOTE: f"Resumed training: continued in run {active.info.run_id}."}.items():
                    self.client.set_tag(launcher_run, key, value)
            continuing = Tag.ENTRY_POINT in active.data.tags
            if continuing and Tag.ERROR in active.data.tags:  # an earlier launch's failure, not this one's
                self.client.delete_tag(active.info.run_id, Tag.ERROR)
            yield active, continuing

    def experiment_id(self, name: str) -> str:
        """The experiment ``name`` (a model family's), created by whichever process needs it first."""
        if (experiment := self.client.get_experiment_by_name(name)) is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another process created it in between
            return self.client.get_experiment_by_name(name).experiment_id

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def finish(self, run_id: str, outcome: Outcome, reason: str = "", also_ended: tuple[str, ...] = ()) -> bool:
        """End ``run_id`` with ``outcome`` if it is still live (or its status is one of
        ``also_ended``, which a caller that knows better may overrule); a failure's reason becomes
        its tag and its description in the UI. The run this process has open (``mlflow.start_run``)
        is ended through the fluent API, so it leaves the active stack too. Returns whether it
        changed anything: a run some other part already ended keeps that part's word."""
        run = self.client.get_run(run_id)
        current = run.info.status
        if current == outcome.status:
            if outcome is Outcome.FAILED and reason:  # ended by its ``with`` block: add only what it lacks
                error = run.data.tags.get(Tag.ERROR) or reason[:MAX_TAG_CHARS]
                self.client.set_tag(run_id, Tag.ERROR, error)
                if not run.data.tags.get(Tag.NOTE, "").startswith("**Failed:**"):
                    self.client.set_tag(run_id, Tag.NOTE, f"**Failed:** {error}")
            return False
        if current not in (*LIVE, *also_ended):
            return False
        if outcome is Outcome.FAILED and reason:
            self.client.set_tag(run_id, Tag.ERROR, reason[:MAX_TAG_CHARS])
            self.client.set_tag(run_id, Tag.NOTE, f"**Failed:** {reason}")
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(outcome.status)
        elif outcome is Outcome.REQUEUED:
            self.client.update_run(run_id, outcome.status)
        else:
            self.client.set_terminated(run_id, outcome.status)
        return True

    def deletion(self, run_id: str, launched: bool) -> str | None:
        """What was deleted under ``run_id`` while it ran (the run, or its experiment with it) and
        what ``finish_deleted`` leaves of it; None while it is live."""
        run = self.client.get_run(run_id)
        if run.info.lifecycle_stage != "deleted":
            return None
        experiment = self.client.get_experiment(run.info.experiment_id)
        if experiment.lifecycle_stage == "deleted":
            return (f"its experiment {experiment.name!r} was deleted while it ran (mlflow experiments restore "
                    f"--experiment-id {experiment.experiment_id} brings it back)")
        if launched:
            return (f"it was deleted while it ran; it stays, FAILED, for its launcher to end "
                    f"(mlflow runs delete --run-id {run_id} deletes it again)")
        return f"it was deleted while it ran (mlflow runs restore --run-id {run_id} brings it back)"

    def finish_deleted(self, run_id: str, outcome: Outcome, reason: str, launched: bool) -> None:
        """End a run someone deleted while it ran: a store refuses every write to a deleted run, so
        it is restored to be ended. It is deleted again unless a launcher (``mlflow run``, which
        writes the status of its run when the command exits, whatever it holds) still has to end
        it and would stop in a traceback of its own; a deleted experiment stays deleted either way."""
        self.client.restore_run(run_id)
        self.finish(run_id, outcome, reason)
        if not launched:
            self.client.delete_run(run_id)
