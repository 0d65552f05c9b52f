"""Registry pages: models, versions with their lineage, promotion history, and promotion or
rollback through the gates of ``registry.promote``."""
from __future__ import annotations

from flask import Blueprint, abort, url_for
from flask_login import current_user, login_required

from dinomx.errors import UserError
from portal.access import AccessDenied, authorize_alias_move
from portal.web import answer, audit, mlflow, payload, text
from registry.audit import trail as audit_trail
from registry.lineage import BadModelReference, Lineage, RegistryError, equals, format_chain, lineage_chain, registry_errors
from registry.mlflow_service import Tag
from registry.promote import LOCK_PREFIX, PromotionRefused, promote, rollback

bp = Blueprint("registry", __name__)


def _versions(name: str) -> list[dict]:
    client = mlflow().client
    # Search results leave version aliases empty; the registered model has them all.
    with registry_errors(f"{name}: "):
        aliases = client.get_registered_model(name).aliases
    rows = []
    for v in sorted(client.search_model_versions(equals("name", name)), key=lambda v: int(v.version), reverse=True):
        try:
            lineage = Lineage.from_tags(v.tags)
        except RegistryError:
            lineage = None
        rows.append({"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
                     "parent": lineage.parent if lineage else "", "data": lineage.data_path if lineage else "",
                     "validation": str(lineage.validation_success).lower() if lineage else "",
                     "created": v.creation_timestamp})
    return rows


@bp.get("/registry")
@bp.get("/api/models", endpoint="api_models")
@login_required
def registry():
    models = [m for m in mlflow().client.search_registered_models() if not m.name.startswith(LOCK_PREFIX)]
    rows = [{"name": m.name, "kind": m.tags.get(Tag.KIND, ""), "aliases": dict(m.aliases)} for m in models]
    return answer(rows, "registry.html", models=rows)


@bp.get("/registry/<name>")
@bp.get("/api/models/<name>", endpoint="api_model")
@login_required
def model_page(name: str):
    try:
        versions = _versions(name)
    except (RegistryError, BadModelReference):
        abort(404, f"no registered model {name!r}")
    if not versions:
        abort(404, f"no registered model {name!r}")
    chains = {}
    for row in versions[:5]:
        try:
            chains[row["version"]] = format_chain(lineage_chain(mlflow().client, f"models:/{name}/{row['version']}"))
        except RegistryError as exc:
            chains[row["version"]] = f"lineage incomplete: {exc}"
    trail = audit_trail(mlflow().client, name)
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
