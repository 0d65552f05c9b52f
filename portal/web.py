"""What every area of the portal shares: its settings and services, the audit log, reading a
request's fields, and answering as JSON (the API, under ``/api/``) or as a page."""
from __future__ import annotations

import json
from functools import wraps
from urllib.parse import urlsplit

from flask import abort, current_app, g, jsonify, redirect, render_template, request
from flask_login import current_user, login_required

from portal.access import AccessDenied, BadPath, level_of, require
from portal.db import AuditEvent, Dataset, db
from portal.settings import Settings
from portal.storage import Storage
from registry.mlflow_service import MlflowService

# Row ids in URLs: larger numbers are no row (and overflow the database's integer).
ID = "int(max=2147483647)"


def settings() -> Settings:
    return current_app.extensions["vf.settings"]


def storage() -> Storage:
    return current_app.extensions["vf.storage"]


def mlflow() -> MlflowService:
    return current_app.extensions["vf.mlflow"]


def wants_json() -> bool:
    return request.path.startswith("/api/")


def answer(body, template: str | None = None, status: int = 200, to: str | None = None, **context):
    """The one way a view answers: ``body`` as JSON for the API; for a page, a redirect ``to`` a
    URL or ``template`` rendered with ``context``."""
    if wants_json():
        return jsonify(body), status
    if to is not None:
        return redirect(to)
    return render_template(template, **context), status


def refuse(message: str, status: int, **body):
    """An error answer: JSON ``{"error": ...}`` for the API, the error page otherwise."""
    return answer({"error": message, **body}, "error.html", status, message=message)


def audit(action: str, target: str = "", outcome: str = "ok", user: str | None = None, **detail) -> None:
    who = user or (current_user.username if current_user and current_user.is_authenticated else "anonymous")
    db.session.rollback()  # a refusal may come from inside a failed transaction
    db.session.add(AuditEvent(user=who, action=action, target=target[:512], outcome=outcome, detail=detail))
    db.session.commit()
    if outcome != "ok":
        g.refusal_audited = True


def audit_refusal(status: int, reason: str) -> None:
    """An action (anything but a read) refused and not yet audited by its view."""
    if request.method not in ("GET", "HEAD", "OPTIONS") and not g.get("refusal_audited"):
        audit(request.endpoint or "request", request.path, outcome="refused", status=status, reason=reason[:500])


MAX_JSON_DEPTH = 32


def payload() -> dict:
    """The request's fields: the form of a page, the JSON object of an API call. A body that is
    not JSON, nests deeper than ``MAX_JSON_DEPTH`` or holds text that is not Unicode (a lone
    surrogate) is the client's error, answered 400 before anything reads it."""
    if not wants_json():
        return request.form.to_dict()
    raw = request.get_data(cache=True)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadPath(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadPath(f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadPath(f"body: expected a JSON object, got {type(data).__name__}")
    _check_json(data, "body", 0)
    return data


def _check_json(value, where: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise BadPath(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadPath(f"{where}: not valid Unicode text (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, where, depth + 1)
            _check_json(item, key if where == "body" else f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1)


def text(data: dict, name: str, default: str = "") -> str:
    """A text field of a form or JSON body; a number, list or object there is the client's error."""
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadPath(f"{name}: expected a string, got {type(value).__name__}")
    return value


def same_origin_path(target: str) -> str | None:
    """``target`` when it is a plain path on this site, else None. Browsers drop tabs and newlines
    and read a backslash as a slash, so "/<tab>/evil.example" and "/<backslash>evil.example" lead
    off-site."""
    if not target.startswith("/") or any(c.isspace() or c == "\\" or ord(c) < 32 for c in target):
        return None
    parts = urlsplit(target)
    return target if not (parts.scheme or parts.netloc or target.startswith("//")) else None


def dataset_for(dataset_id: int, level: str) -> Dataset:
    dataset = db.session.get(Dataset, dataset_id)
    # Datasets a user holds nothing on do not exist for them.
    if dataset is None or level_of(current_user, dataset) is None:
        abort(404)
    require(current_user, dataset, level)
    return dataset


def admin_only(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            raise AccessDenied(f"{current_user.username} is not an administrator")
        return view(*args, **kwargs)
    return login_required(wrapped)


def plain(value) -> str:
    """A value as a page shows it to a person: no Python or JSON literals (None, True, {"...)."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {plain(item)}" for key, item in sorted(value.items())) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(item) for item in value) or "—"
    return str(value)
