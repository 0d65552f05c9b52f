"""Load the models promoted to an alias, and check that they belong together."""
from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dinomx.classifiers import ClassifierHeads
from dinomx.embed import Embedder
from registry.lineage import Lineage, version_uri


class ServingError(RuntimeError):
    """The registry holds no servable set of models for the requested alias."""


@dataclass
class PromotedModels:
    backbone_uri: str
    embedder: Embedder
    head_uri: str | None
    heads: ClassifierHeads | None


def load_promoted(name: str, alias: str, client: MlflowClient | None = None) -> PromotedModels:
    """``<name>-backbone@alias`` and, if one is promoted, ``<name>-head@alias``.

    A head only makes sense on the embeddings it was trained on, so a head whose parent is not
    the promoted backbone version is refused rather than served with wrong answers.
    """
    client = client or MlflowClient()
    try:
        backbone = client.get_model_version_by_alias(f"{name}-backbone", alias)
    except MlflowException as exc:
        raise ServingError(f"no version of {name}-backbone holds @{alias}: {exc.message}") from None
    backbone_uri = version_uri(backbone)
    embedder = mlflow.pyfunc.load_model(backbone_uri).unwrap_python_model().embedder
    try:
        head = client.get_model_version_by_alias(f"{name}-head", alias)
    except MlflowException:
        return PromotedModels(backbone_uri, embedder, None, None)
    parent = Lineage.from_tags(head.tags).parent
    if parent != backbone_uri:
        raise ServingError(
            f"{version_uri(head)} (@{alias}) was trained on {parent}, but @{alias} of {name}-backbone is "
            f"{backbone_uri}; promote a head trained on that backbone"
        )
    heads = mlflow.pyfunc.load_model(version_uri(head)).unwrap_python_model().heads
    return PromotedModels(backbone_uri, embedder, version_uri(head), heads)
