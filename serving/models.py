"""Load the models promoted to an alias, and check that they belong together.

The process that starts the service's workers checks the alias and downloads the models' files
once (``prefetch``); each worker then loads that copy (``load_at_start``) without opening the
registry, and follows later promotions from the registry itself. The engine (torch,
transformers) loads with the models, in the workers only.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from dinomx.drift import Reference
from dinomx.errors import DataError, one_line
from registry import audit
from registry.evidence import recorded
from registry.ledger import LedgerBroken, LedgerUnavailable
from registry.lineage import Lineage, alias_holder, version_uri
from registry.mlflow_service import MlflowService
from registry.promote import ledger_of
from serving import log, watch
from serving.watch import Watch

if TYPE_CHECKING:
    from dinomx.embed import Embedder
    from dinomx.probes import TaskHeads

# Set by ``prefetch`` for the workers it starts: the set it checked and where its files are.
PREFETCHED = "VF_PREFETCHED"
Uris = tuple[str, str | None]


class ServingError(RuntimeError):
    """The registry holds no servable set of models for the requested alias, or one the gates did
    not put there."""


@dataclass
class PromotedModels:
    backbone_uri: str
    embedder: Embedder
    head_uri: str | None
    heads: TaskHeads | None
    watch: Watch
    tiling: str = ""  # the head's lineage: how /predict_slide cuts a slide (empty: the head was fitted on no tiles)

    @property
    def uris(self) -> tuple[str, str | None]:
        return self.backbone_uri, self.head_uri


def gated_holder(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version of ``model`` holding ``alias``, if the gates put it there: refused when the
    promotion ledger (``VF_AUDIT_DB``, signatures checked with ``VF_AUDIT_KEY``) does not verify or
    its newest record for the alias names another version."""
    holder = alias_holder(client, model, alias)
    if holder is None:
        return None
    try:
        reason = audit.unaudited_reason(ledger_of(client), holder, alias)
    except (LedgerBroken, LedgerUnavailable) as exc:
        reason = str(exc)
    if reason:
        raise ServingError(f"refused to follow {model}@{alias}: {reason}")
    return holder


def servable_uris(name: str, alias: str, client: MlflowClient | None = None) -> Uris:
    """``models:/`` URIs of the backbone and head (if any) holding ``alias``, put there by the
    gates. A head only makes sense on the embeddings it was trained on, so a head whose parent is
    not the promoted backbone version is refused rather than served with wrong answers.
    ``ServingError`` says what is wrong and what to do."""
    client = client or MlflowService().client
    backbone = gated_holder(client, f"{name}-backbone", alias)
    if backbone is None:
        raise ServingError(f"no version of {name}-backbone holds @{alias}: promote one "
                           f"(python -m registry.promote models:/{name}-backbone/<version> --alias {alias}), "
                           "or set VF_MODEL_ALIAS to an alias that is held")
    backbone_uri = version_uri(backbone)
    head = gated_holder(client, f"{name}-head", alias)
    if head is None:
        return backbone_uri, None
    parent = Lineage.from_tags(head.tags).parent
    if parent != backbone_uri:
        raise ServingError(
            f"{version_uri(head)} (@{alias}) was trained on {parent}, but @{alias} of {name}-backbone is "
            f"{backbone_uri}; promote a head trained on that backbone"
        )
    return backbone_uri, version_uri(head)


def download(uris: Uris, folder: Path) -> dict[str, str]:
    """Each model's files under ``folder``, by URI; ``ServingError`` names a version whose files
    the artifact store will not give."""
    paths = {}
    for index, uri in enumerate(u for u in uris if u):
        try:
            paths[uri] = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder / str(index)))
            # A store that has nothing at the version's source answers with an empty folder.
            if not (Path(paths[uri]) / "MLmodel").is_file():
                raise FileNotFoundError("no MLmodel file at the version's source")
        except Exception as exc:  # each artifact store (files, S3, the tracking server) fails its own way
            raise ServingError(f"{uri} cannot be read from the artifact store ({type(exc).__name__}: "
                               f"{one_line(exc)[:300]}); check the store's address and credentials, "
                               "or promote a version whose files exist") from None
    return paths


def head_tiling(uris: Uris, client: MlflowClient | None = None) -> str:
    """The tiling in the lineage of the head of ``uris`` (``data.tiling``), empty without one."""
    head = uris[1]
    if not head:
        return ""
    name, _, version = head.removeprefix("models:/").rpartition("/")
    client = client or MlflowService().client
    return Lineage.from_tags(client.get_model_version(name, version).tags).tiling


def fetch_reference(backbone_uri: str, folder: Path, client: MlflowClient | None = None) -> dict:
    """The drift reference of the promotion service's newest evaluation of ``backbone_uri``, in its
    ledger, fetched into ``folder``: {path, sha256, run_id}, or {note} saying why there is none.
    One the artifact store will not give, or that is not the one the ledger names, is refused."""
    client = client or MlflowService().client
    name, _, version = backbone_uri.removeprefix("models:/").rpartition("/")
    evaluation = recorded(ledger_of(client).entries(), client.get_model_version(name, version))
    if evaluation is None or not evaluation.reference:
        said = (f"its newest evaluation by the promotion service (run {evaluation.run_id}) has none" if evaluation
                else "the promotion service has not evaluated it")
        return {"note": f"no reference: {said}; inputs are served unwatched until `python -m registry.evidence "
                        f"{backbone_uri}` records one"}
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=evaluation.reference["uri"], dst_path=str(folder))
        Reference.load(path, evaluation.reference["sha256"]).check(backbone_uri)
    except DataError as exc:
        raise ServingError(f"{backbone_uri}: drift reference refused: {exc}") from None
    except Exception as exc:  # each artifact store fails its own way
        raise ServingError(f"{backbone_uri}: its drift reference {evaluation.reference['uri']} cannot be read "
                           f"({type(exc).__name__}: {one_line(exc)[:200]})") from None
    return {"path": path, "sha256": evaluation.reference["sha256"], "run_id": evaluation.run_id}


def watch_of(backbone_uri: str, dim: int, fetched: dict) -> Watch:
    """The watch of a loaded backbone (of embedding size ``dim``) over its fetched reference."""
    if not watch.ON:
        return Watch(backbone_uri, None, "not watched: VF_WATCH=off")
    if "note" in fetched:
        return Watch(backbone_uri, None, fetched["note"])
    reference = Reference.load(fetched["path"], fetched["sha256"])
    if reference.dim != dim:
        raise ServingError(f"{backbone_uri}: drift reference refused: it holds {reference.dim}-d embeddings, the "
                           f"backbone makes {dim}-d ones")
    watch.TESTER.start()
    return Watch(backbone_uri, reference, "", fetched["run_id"])


def prefetch(name: str, alias: str, client: MlflowClient | None = None) -> Uris:
    """In the process that starts the workers, before it does: the set holding ``alias``, checked,
    and its files and drift reference downloaded once for every worker (``PREFETCHED`` in the
    environment says where; the copy goes when this process exits)."""
    uris = servable_uris(name, alias, client)
    folder = Path(tempfile.mkdtemp(prefix="vision-foundry-models-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[PREFETCHED] = json.dumps({"uris": uris, "paths": download(uris, folder),
                                         "tiling": head_tiling(uris, client),
                                         "reference": fetch_reference(uris[0], folder / "reference", client)})
    return uris


def _load(uri: str):
    # The service runs in the image built from the lock file, not in the model's logged
    # environment: MLflow's comparison of the two (a scan of every installed distribution, 1.5 s
    # of each start) has nothing to tell.
    return mlflow.pyfunc.load_model(uri, suppress_warnings=True).unwrap_python_model()


def load(uris: Uris, paths: dict[str, str] | None = None, tiling: str | None = None,
         reference: dict | None = None) -> PromotedModels:
    """The checked set ``uris``, from the local copies in ``paths`` where given; the head's
    ``tiling`` and the backbone's drift ``reference`` (``fetch_reference``) read from the registry
    unless given."""
    backbone_uri, head_uri = uris
    paths = paths or {}
    embedder = _load(paths.get(backbone_uri, backbone_uri)).embedder
    heads = _load(paths.get(head_uri, head_uri)).heads if head_uri else None
    if reference is None:
        with tempfile.TemporaryDirectory(prefix="vision-foundry-reference-") as folder:
            watcher = watch_of(backbone_uri, embedder.dim, fetch_reference(backbone_uri, Path(folder)))
    else:
        watcher = watch_of(backbone_uri, embedder.dim, reference)
    return PromotedModels(backbone_uri, embedder, head_uri, heads, watcher,
                          head_tiling(uris) if tiling is None else tiling)


def load_promoted(name: str, alias: str, client: MlflowClient | None = None) -> PromotedModels:
    """``<name>-backbone@alias`` and, if one is promoted, ``<name>-head@alias``."""
    return load(servable_uris(name, alias, client))


def load_at_start(name: str, alias: str) -> PromotedModels:
    """The set the starting process fetched (``prefetch``), else the one holding ``alias`` now."""
    if fetched := os.environ.get(PREFETCHED):
        held = json.loads(fetched)
        log.info("loading %s from the copy fetched at start", held["uris"])
        return load(tuple(held["uris"]), held["paths"], held["tiling"], held["reference"])
    return load_promoted(name, alias)
