"""Load the models promoted to an alias, and check that they belong together.

The engine (torch, transformers) loads with the models, in the service's workers: the process
that only checks the alias before starting them (``check_servable``) does not pay for it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from dinomx.errors import one_line
from registry import audit
from registry.lineage import Lineage, alias_holder, version_uri
from registry.mlflow_service import MlflowService

if TYPE_CHECKING:
    from dinomx.embed import Embedder
    from dinomx.probes import TaskHeads


class ServingError(RuntimeError):
    """The registry holds no servable set of models for the requested alias, or one the gates did
    not put there."""


@dataclass
class PromotedModels:
    backbone_uri: str
    embedder: Embedder
    head_uri: str | None
    heads: TaskHeads | None

    @property
    def uris(self) -> tuple[str, str | None]:
        return self.backbone_uri, self.head_uri


def gated_holder(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version of ``model`` holding ``alias``, if the gates put it there: a holder whose latest
    promotion record names another version, or none (checked against ``VF_AUDIT_KEY`` when the
    service has it), was moved outside them and is refused."""
    holder = alias_holder(client, model, alias)
    if holder is not None and (reason := audit.unaudited_reason(client, holder, alias, audit.audit_key())):
        raise ServingError(f"refused to follow {model}@{alias}: {reason}")
    return holder


def promoted_uris(name: str, alias: str, client: MlflowClient | None = None) -> tuple[str | None, str | None]:
    """``models:/`` URIs of the backbone and head holding ``alias`` now (None where none does)."""
    client = client or MlflowService().client
    holders = (gated_holder(client, f"{name}-backbone", alias), gated_holder(client, f"{name}-head", alias))
    return tuple(version_uri(mv) if mv else None for mv in holders)


def check_servable(name: str, alias: str, client: MlflowClient | None = None) -> tuple[str, str | None]:
    """The URIs ``load_promoted`` would load, checked without loading them: the alias is held
    (by versions the gates put there) and each version's files can be read from the artifact
    store. ``ServingError`` says what is wrong and what to do."""
    backbone, head = promoted_uris(name, alias, client)
    if backbone is None:
        raise ServingError(f"no version of {name}-backbone holds @{alias}: promote one "
                           f"(python -m registry.promote models:/{name}-backbone/<version> --alias {alias}), "
                           "or set VF_MODEL_ALIAS to an alias that is held")
    for uri in (backbone, head):
        if uri is None:
            continue
        try:
            with tempfile.TemporaryDirectory() as folder:
                mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=folder)
        except Exception as exc:  # each artifact store (files, S3, the tracking server) fails its own way
            raise ServingError(f"{uri} (@{alias}) cannot be read from the artifact store "
                               f"({type(exc).__name__}: {one_line(exc)[:300]}); check the store's "
                               "address and credentials, or promote a version whose files exist") from None
    return backbone, head


def _load(uri: str):
    # The service runs in the image built from the lock file, not in the model's logged
    # environment: MLflow's comparison of the two (a scan of every installed distribution, 1.5 s
    # of each start) has nothing to tell.
    return mlflow.pyfunc.load_model(uri, suppress_warnings=True).unwrap_python_model()


def load_promoted(name: str, alias: str, client: MlflowClient | None = None) -> PromotedModels:
    """``<name>-backbone@alias`` and, if one is promoted, ``<name>-head@alias``.

    A head only makes sense on the embeddings it was trained on, so a head whose parent is not
    the promoted backbone version is refused rather than served with wrong answers.
    """
    client = client or MlflowService().client
    backbone = gated_holder(client, f"{name}-backbone", alias)
    if backbone is None:
        raise ServingError(f"no version of {name}-backbone holds @{alias}")
    backbone_uri = version_uri(backbone)
    embedder = _load(backbone_uri).embedder
    head = gated_holder(client, f"{name}-head", alias)
    if head is None:
        return PromotedModels(backbone_uri, embedder, None, None)
    parent = Lineage.from_tags(head.tags).parent
    if parent != backbone_uri:
        raise ServingError(
            f"{version_uri(head)} (@{alias}) was trained on {parent}, but @{alias} of {name}-backbone is "
            f"{backbone_uri}; promote a head trained on that backbone"
        )
    heads = _load(version_uri(head)).heads
    return PromotedModels(backbone_uri, embedder, version_uri(head), heads)
