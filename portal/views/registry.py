"""Registry pages: models, versions with their lineage, promotion history, and promotion or
rollback through the gates of ``registry.promote``."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flask import Blueprint, abort, request, url_for
from flask_login import current_user, login_required
from mlflow import artifacts as mlflow_artifacts
from mlflow.exceptions import MlflowException

from data.report import ValidationReport
from dinomx.errors import UserError
from portal.access import AccessDenied, authorize_alias_move
from portal.web import answer, audit, mlflow, payload, settings, text
from registry import data_check
from registry.audit import trail as audit_trail
from registry.evidence import recorded
from registry.ledger import LedgerBroken, LedgerUnavailable
from registry.lineage import (
    BadModelReference,
    Lineage,
    RegistryError,
    RegistryUnavailable,
    equals,
    format_chain,
    lineage_chain,
    registry_errors,
    version_uri,
)
from registry.mlflow_service import Tag, evaluation_metrics, ui_link
from registry.promote import PromotionRefused, ledger_of, promote, rollback

bp = Blueprint("registry", __name__)
MAX_NAME = 256  # MLflow's own limit on a registered model's name


@bp.url_value_preprocessor
def _known_shape(endpoint, values):
    """A name no registered model can have (control characters, over-long) is not found, before
    any store is asked (a database's refusal of a NUL byte is not the caller's business)."""
    name = (values or {}).get("name")
    if name is not None and (len(name) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        abort(404, f"no registered model {name[:80]!r}")


def _registered(name: str):
    try:
        with registry_errors(f"{name}: "):
            return mlflow().client.get_registered_model(name)
    except (RegistryError, BadModelReference):
        abort(404, f"no registered model {name!r}")


def _row(client, v, aliases: dict, evaluations: list) -> dict:
    """One version as the pages show it: lineage (``validation``: what its training run said of its
    data; ``validated``: the promotion service's own verdict, None until it has one), the promotion
    service's evaluation (what the gates read; ``reported``: what its researchers' own evaluate runs
    wrote on it), the training run's learning verdict and where to read more."""
    service = recorded(evaluations, v)
    try:
        lineage = Lineage.from_tags(v.tags)
    except RegistryError:
        lineage = None
    try:
        validated = data_check.recorded(evaluations, data_check.question(lineage, version_uri(v))) if lineage else None
    except data_check.DataUnavailable:
        validated = None
    run = client.get_run(v.run_id) if v.run_id else None
    ui = settings().mlflow_ui_url
    return {"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
            "kind": lineage.kind if lineage else "", "parent": lineage.parent if lineage else "",
            "data": lineage.data_path if lineage else "", "data_md5": lineage.data_md5 if lineage else "",
            "validation": str(lineage.validation_success).lower() if lineage else "",
            "validated": validated.success if validated else None,
            "code": lineage.git_commit[:12] if lineage else "", "config": lineage.config_sha256[:12] if lineage else "",
            "evaluation": service.metrics if service else {}, "evaluated_on": service.data_md5 if service else None,
            "reported": evaluation_metrics(v.tags),
            "learning": run.data.tags.get(Tag.LEARNING, "not measured") if run else "",
            "learned": run.data.tags.get(Tag.LEARNED) if run else None,
            "created": v.creation_timestamp,
            "links": {"version": ui_link(ui, f"models/{v.name}/versions/{v.version}"),
                      "run": ui_link(ui, f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}") if run else None,
                      "validation_report": url_for("registry.validation_report", name=v.name, version=str(v.version))}}


def _versions(name: str, entries: list) -> list[dict]:
    """Every version of ``name``, newest first, with the ledger's ``entries`` (verified once per page)."""
    client = mlflow().client
    # Search results leave version aliases empty; the registered model has them all.
    aliases = _registered(name).aliases
    return [_row(client, v, aliases, entries) for v in sorted(client.search_model_versions(equals("name", name)),
                                                     key=lambda v: int(v.version), reverse=True)]


def _version(name: str, version: str):
    try:
        with registry_errors(f"models:/{name}/{version}: "):
            return mlflow().client.get_model_version(name, version)
    except (RegistryError, BadModelReference):
        abort(404, f"no version {version!r} of registered model {name!r}")


@bp.get("/registry/<name>/<version>/validation-report")
@bp.get("/api/models/<name>/<version>/validation-report", endpoint="api_validation_report")
@login_required
def validation_report(name: str, version: str):
    """The validation report of the data a version was trained on, read from the run's artifacts
    (a link in a browser, where the lineage tag holds an artifact URI)."""
    mv = _version(name, version)
    uri = Lineage.from_tags(mv.tags).validation_report
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = json.loads(Path(mlflow_artifacts.download_artifacts(uri, dst_path=tmp)).read_text())
        readable = ValidationReport.from_dict(report)
    except (MlflowException, OSError, ValueError, TypeError, KeyError) as exc:
        abort(404, f"validation report {uri} of models:/{name}/{version} cannot be read: {str(exc)[:300]}")
    return answer(report, "validation_report.html", report=readable, model=f"models:/{name}/{version}", uri=uri)


@bp.get("/registry/<name>/compare")
@bp.get("/api/models/<name>/compare", endpoint="api_compare")
@login_required
def compare(name: str):
    """Two versions side by side: metrics with the difference, where their lineage differs, and
    whether each learned."""
    a, b = request.args.get("a", ""), request.args.get("b", "")
    client = mlflow().client
    aliases = _registered(name).aliases
    evaluations = ledger_of(client).entries()
    left, right = (_row(client, _version(name, v), aliases, evaluations) for v in (a, b))
    metrics = sorted(set(left["evaluation"]) | set(right["evaluation"]))
    table = [{"metric": m, "a": left["evaluation"].get(m), "b": right["evaluation"].get(m),
              "difference": (right["evaluation"][m] - left["evaluation"][m])
              if m in left["evaluation"] and m in right["evaluation"] else None} for m in metrics]
    lineage = [{"field": f, "a": left[f], "b": right[f]} for f in ("parent", "data", "data_md5", "validation", "code", "config")
               if left[f] != right[f]]
    body = {"name": name, "a": left, "b": right, "metrics": table, "lineage": lineage}
    return answer(body, "compare.html", **body)


@bp.get("/registry")
@bp.get("/api/models", endpoint="api_models")
@login_required
def registry():
    models = mlflow().client.search_registered_models()
    rows = [{"name": m.name, "kind": m.tags.get(Tag.KIND, ""), "aliases": dict(m.aliases)} for m in models]
    return answer(rows, "registry.html", models=rows)


@bp.get("/registry/<name>")
@bp.get("/api/models/<name>", endpoint="api_model")
@login_required
def model_page(name: str):
    entries = ledger_of(mlflow().client).entries()
    versions = _versions(name, entries)
    if not versions:
        abort(404, f"no registered model {name!r}")
    chains = {}
    for row in versions[:5]:
        try:
            chains[row["version"]] = format_chain(lineage_chain(mlflow().client, f"models:/{name}/{row['version']}"))
        except RegistryError as exc:
            chains[row["version"]] = f"lineage incomplete: {exc}"
    trail = audit_trail(entries, name)
    return answer({"name": name, "versions": versions, "lineage": chains, "audit": trail}, "model.html", name=name,
                  versions=versions, chains=chains, trail=trail, may_promote=current_user.is_admin or current_user.can_promote)


def _authorize(name: str) -> None:
    authorize_alias_move(current_user, name)


def _together(data: dict) -> list[str]:
    """The other members of a consistent set (``with``: a list, or comma-separated text)."""
    value = data.get("with") or []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise PromotionRefused("input", "with: expected model URIs (a list, or comma-separated)")
    return [i.strip() for i in items if i.strip()]


def _move(action: str, name: str, target: str, move):
    """Run an alias move (``move(client)`` returns its records), auditing each moved version or the refusal."""
    try:
        records = move(mlflow().client)
    except AccessDenied as exc:
        audit(action, target, outcome="denied", reason=str(exc))
        raise
    except (RegistryUnavailable, LedgerUnavailable, LedgerBroken):
        raise  # a 503 whose words go to the log and the audit, not to the caller
    except UserError as exc:
        audit(action, target, outcome="refused", reason=str(exc))
        raise exc if isinstance(exc, PromotionRefused) else PromotionRefused("input", str(exc)) from None
    for record in records:
        audit(action, f"models:/{record['model']}/{record['version']}", alias=record["alias"], previous=record["previous"])
    return answer(records[0] | {"set": records}, to=url_for("registry.model_page", name=name))


@bp.post("/registry/<name>/promote")
@bp.post("/api/models/<name>/promote", endpoint="api_promote")
@login_required
def promote_model(name: str):
    data = payload()
    uri = f"models:/{name}/{text(data, 'version')}"
    return _move("model.promote", name, uri, lambda client: promote(
        client, uri, text(data, "alias"), text(data, "reason") or "(none)", user=current_user.username,
        together=_together(data), authorize=_authorize))


@bp.post("/registry/<name>/rollback")
@bp.post("/api/models/<name>/rollback", endpoint="api_rollback")
@login_required
def rollback_model(name: str):
    data = payload()
    return _move("model.rollback", name, name, lambda client: rollback(
        client, name, text(data, "alias"), text(data, "reason") or "(none)", user=current_user.username,
        together=_together(data), authorize=_authorize))
