"""The platform's one door to MLflow: a client for a tracking URI, the names of the tags the
platform writes on runs and models, and the failure note every entry point leaves on its run.

Lineage tags of a model version are the fields of ``registry.lineage.Lineage`` under
``LINEAGE_PREFIX``; everything else the platform writes is named here, so that a promotion gate,
the portal and the service read the same names the entry points wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

LINEAGE_PREFIX = "vf."
EVAL_PREFIX = "vf.eval."  # evaluation metrics written on a model version by `evaluate`
AUDIT_PREFIX = "vf.audit."  # one promotion or rollback record per tag on a model version
EVAL_RUN_ID = "vf.eval.run_id"  # the evaluate run that wrote them
# Longest tag value the platform writes (MLflow stores up to 8000 characters).
MAX_TAG_CHARS = 5000


class Tag:
    """Names of the tags the platform writes (besides lineage, evaluation and audit)."""

    # runs of the entry points
    ENTRY_POINT = "vf.entry_point"
    CONFIG_SHA256 = "vf.config_sha256"
    GIT_COMMIT = "vf.git_commit"
    GIT_DIRTY = "vf.git_dirty"
    PARENT = "vf.parent"
    EVALUATED_MODEL = "vf.evaluated_model"
    DEFAULT_HEAD = "vf.default_head"
    ERROR = "vf.error"
    NOTE = MLFLOW_RUN_NOTE  # MLflow's own: the run's description in the UI
    # training that stops and goes on
    INTERRUPTED = "vf.interrupted"
    CHECKPOINT = "vf.checkpoint"
    RESUMED_FROM = "vf.resumed_from"
    CONTINUED_IN = "vf.continued_in"
    COLLAPSE = "vf.collapse"
    COLLAPSE_STEP = "vf.collapse_step"
    # schedulers and the portal
    SLURM_JOB_ID = "vf.slurm.job_id"
    SLURM_STATE = "vf.slurm.state"
    SLURM_ENDED = "vf.slurm.ended"
    PORTAL_JOB = "vf.portal.job"
    PORTAL_OWNER = "vf.portal.owner"
    PORTAL_BACKEND = "vf.portal.backend"
    # registered models
    KIND = "vf.kind"  # backbone | head | lock
    LOCK_OWNER = "vf.owner"
    LOCK_TOKEN = "vf.token"


def evaluation_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The ``vf.eval.*`` metrics among a model version's tags."""
    return {k.removeprefix(EVAL_PREFIX): float(v) for k, v in tags.items() if k.startswith(EVAL_PREFIX) and k != EVAL_RUN_ID}


@dataclass(frozen=True)
class MlflowService:
    """The tracking/registry server a part of the platform talks to (``None``: MLflow's own
    resolution, ``MLFLOW_TRACKING_URI`` first)."""

    tracking_uri: str | None = None

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def fail_run(self, run_id: str, message: str) -> None:
        """What a failed run says in the UI: the reason as a tag and as its description."""
        self.client.set_tag(run_id, Tag.ERROR, message[:MAX_TAG_CHARS])
        self.client.set_tag(run_id, Tag.NOTE, f"**Failed:** {message}")
