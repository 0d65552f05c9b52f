"""The tracking server's auth app: MLflow's basic-auth app plus the platform's rules, which MLflow's
per-resource permissions (READ, EDIT, MANAGE) cannot express.

    mlflow server --app-name vision-foundry ...     # the ``mlflow.app`` entry point of this project

After basic-auth has authenticated a request and checked its permissions, for every user who is
not a server administrator (the administrator and the promotion service ``vf-gate`` are):
- read-only identities (``VF_READ_ONLY_USERS``, default ``vf-serving``) may only read: GET and the
  search endpoints that MLflow serves over POST;
- registered models are created, renamed and deleted only by the promotion service (asking to
  create one that exists still gets MLflow's own "already exists", which registering a version
  relies on); aliases are moved only by it;
- an experiment is created only under the name of a family the user is a member of (EDIT on
  ``<family>-backbone`` or ``<family>-head``), every member of the family may then log into it
  (EDIT), and no researcher deletes, restores or renames it;
- the tags the platform's own records and lineage live in (``vf.*`` on registered models and
  versions, except a researcher's own ``vf.eval.*`` evaluation and its table): lineage is written
  once, when a version is registered (set where absent, never changed or deleted), and audit
  copies (``vf.audit.*``) only by the promotion service; a new version never carries one.
Rules are chosen by the endpoint Flask routed the request to, so ``/ajax-api``, trailing slashes
and percent-encoded paths meet the same rule as the plain path.
"""
from __future__ import annotations

import os

from flask import Flask, jsonify, request
from mlflow.exceptions import MlflowException
from mlflow.server import app as mlflow_app
from mlflow.server import auth

from registry.mlflow_service import AUDIT_PREFIX, EVAL_PREFIX, LINEAGE_PREFIX, Tag

READ_ONLY_ENV = "VF_READ_ONLY_USERS"
# Reads MLflow serves over POST (a search's filter does not fit a query string).
READ_POSTS = frozenset({"_search_runs", "_search_experiments", "_search_logged_models", "serve_search_datasets",
                        "_search_traces_v3", "_search_evaluation_datasets_handler", "_get_latest_versions",
                        "_batch_get_trace_infos", "_query_trace_metrics", "_search_issues", "_graphql"})
SERVICE_ONLY = {
    "_create_registered_model": "registered models are created by the promotion service (vf-gate)",
    "_rename_registered_model": "registered models are renamed by the promotion service only",
    "_delete_registered_model": "registered models are deleted by the promotion service only",
    "_delete_model_version": "model versions are deleted by the promotion service only",
    "_set_registered_model_alias": "aliases move through the promotion gates only (python -m registry.promote, the portal)",
    "_delete_registered_model_alias": "aliases move through the promotion gates only",
    "_transition_stage": "stages are not used: aliases move through the promotion gates only",
    "_delete_experiment": "experiments are kept: only the administrator deletes one",
    "_restore_experiment": "experiments are restored by the administrator only",
    "_update_experiment": "experiments keep their family's name",
}
TAG_ENDPOINTS = ("_set_registered_model_tag", "_delete_registered_model_tag", "_set_model_version_tag",
                 "_delete_model_version_tag")
# What a researcher's own evaluate run writes on a version: information, shown as theirs.
RESEARCHER_TAGS = (EVAL_PREFIX, Tag.EVALUATION_TABLE)
FAMILY_KINDS = ("backbone", "head")


def _refuse(message: str):
    answer = jsonify(error_code="PERMISSION_DENIED", message=f"Permission denied: {message}")
    answer.status_code = 403
    return answer


def _param(name: str, default=None):
    try:
        return auth._get_request_param(name)
    except MlflowException:
        return default


def _read_only_users() -> set[str]:
    return {u.strip() for u in os.environ.get(READ_ONLY_ENV, "vf-serving").split(",") if u.strip()}


def _member_of(username: str, family: str) -> bool:
    for kind in FAMILY_KINDS:
        try:
            permission = auth.store.get_registered_model_permission(f"{family}-{kind}", username)
        except MlflowException:
            continue
        if permission.permission in ("EDIT", "MANAGE"):
            return True
    return False


def _found(lookup):
    """What ``lookup`` finds in the registry's store, None where there is nothing (MLflow answers
    for that itself)."""
    from mlflow.server.handlers import _get_model_registry_store

    try:
        return lookup(_get_model_registry_store())
    except MlflowException:
        return None


def _current_tags(endpoint: str) -> dict[str, str]:
    """The tags of the registered model or version a tag request names."""
    name = str(_param("name", ""))
    if endpoint.endswith("_model_version_tag"):
        found = _found(lambda store: store.get_model_version(name, str(_param("version", ""))))
    else:
        found = _found(lambda store: store.get_registered_model(name))
    return found.tags if found is not None else {}


def _protected(key: str) -> bool:
    return isinstance(key, str) and key.startswith(LINEAGE_PREFIX) and not key.startswith(RESEARCHER_TAGS)


def _platform_rules():
    endpoint = request.endpoint
    if endpoint is None or auth.is_unprotected_route(request.path):
        return None
    username = auth.authenticate_request().username
    if auth.sender_is_admin():
        return None
    if username in _read_only_users() and request.method not in ("GET", "HEAD", "OPTIONS") and endpoint not in READ_POSTS:
        return _refuse(f"{username} is read-only")
    if endpoint in SERVICE_ONLY:
        name = str(_param("name", ""))
        if endpoint == "_create_registered_model" and _found(lambda store: store.get_registered_model(name)) is not None:
            return None  # MLflow answers "already exists", as registering a version expects
        return _refuse(SERVICE_ONLY[endpoint])
    if endpoint == "_create_experiment":
        name = str(_param("name", ""))
        family = next((f for f in _families_of(name) if _member_of(username, f)), None)
        if family is None:
            return _refuse(f"experiment {name!r}: experiments are named after a family you are a member of "
                           "(<family>, or <family>/… or <family>-…)")
    if endpoint in TAG_ENDPOINTS and _protected(key := _param("key", "")):
        if key.startswith(AUDIT_PREFIX) or endpoint.startswith("_delete"):
            return _refuse(f"tag {key!r}: the platform's records and lineage are written by the promotion service")
        current = _current_tags(endpoint).get(key)
        if current is not None and current != _param("value"):
            return _refuse(f"tag {key!r}: lineage is written once, when the version is registered")
    if endpoint == "_create_model_version":
        tags = _param("tags", []) or []
        keys = [t.get("key", "") for t in tags if isinstance(t, dict)] if isinstance(tags, list) else []
        if any(isinstance(k, str) and k.startswith(AUDIT_PREFIX) for k in keys):
            return _refuse("a new version may carry its lineage, never an audit record")
    return None


def _families_of(experiment: str) -> list[str]:
    """The family names an experiment's name could belong to: itself, and each prefix before a
    ``/`` or ``-``."""
    names = [experiment]
    for index, char in enumerate(experiment):
        if char in "/-" and index:
            names.append(experiment[:index])
    return names


def _share_with_family(response):
    """A family's experiment, made by whichever member ran first, is every member's to log into
    (MLflow alone would give its creator MANAGE and the others READ)."""
    if request.endpoint != "_create_experiment" or response.status_code != 200 or auth.sender_is_admin():
        return response
    creator = auth.authenticate_request().username
    experiment = (response.get_json(silent=True) or {}).get("experiment_id")
    family = next((f for f in _families_of(str(_param("name", ""))) if _member_of(creator, f)), None)
    if experiment and family:
        for user in auth.store.list_users():
            if user.username != creator and _member_of(user.username, family):
                auth.store.create_experiment_permission(experiment, user.username, "EDIT")
    return response


def create_app(app: Flask = mlflow_app):
    served = auth.create_app(app)
    # After basic-auth's own check, which has authenticated the user.
    app.before_request(_platform_rules)
    app.after_request(_share_with_family)
    return served
