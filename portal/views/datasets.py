"""Datasets: S3 prefixes with per-user and per-group grants, and presigned one-object transfers."""
from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, abort, redirect, request, url_for
from flask_login import current_user, login_required

from dinomx.errors import UserError
from dinomx.images import list_images
from dinomx.shards import is_sharded, read_index
from portal.access import AccessDenied, BadPath, clean_prefix, level_of, object_key, visible_datasets
from portal.db import LEVELS, Dataset, Grant, Group, User, db
from portal.storage import StorageUnavailable
from portal.web import ID, answer, audit, dataset_for, payload, settings, storage, text, wants_json

bp = Blueprint("datasets", __name__)


@bp.route("/datasets", methods=["GET", "POST"])
@bp.route("/api/datasets", methods=["GET", "POST"], endpoint="api_datasets")
@login_required
def datasets():
    if request.method == "POST":
        if not current_user.is_admin:
            raise AccessDenied(f"{current_user.username} may not create datasets")
        data = payload()
        name = text(data, "name").strip()
        if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
            raise BadPath(f"name: expected 1 to 64 printable characters, got {name[:80]!r}")
        if db.session.scalar(db.select(Dataset).where(Dataset.name == name)):
            raise BadPath(f"name: {name!r} is taken")
        train_path, report = text(data, "train_path")[:512] or None, text(data, "validation_report")[:512] or None
        check_training_data(settings().project_dir, train_path, report)
        dataset = Dataset(name=name, prefix=clean_prefix(text(data, "prefix")), created_by=current_user.username,
                          train_path=train_path, validation_report=report)
        db.session.add(dataset)
        db.session.commit()
        audit("dataset.create", dataset.name, prefix=dataset.prefix)
        return answer({"id": dataset.id, "name": dataset.name, "prefix": dataset.prefix}, status=201,
                      to=url_for("datasets.dataset_page", dataset_id=dataset.id))
    rows = visible_datasets(current_user)
    return answer([{"id": d.id, "name": d.name, "prefix": d.prefix, "level": level} for d, level in rows],
                  "datasets.html", rows=rows)


def check_training_data(project: Path, train_path: str | None, report: str | None) -> None:
    """What jobs will train on exists where they run (paths relative to the project) and passed
    its validation: found out now, not when the first job fails."""
    if report and not train_path:
        raise BadPath("train_path: a validation report belongs to a training path; give both")
    if not train_path:
        return
    data = project / train_path
    try:
        read_index(data) if is_sharded(data) else list_images(data)
    except UserError as exc:
        raise BadPath(f"train_path: {exc}") from None
    if not report:
        raise BadPath(f"train_path: {train_path} needs its validation_report (validation/report.json beside the "
                      "dataset); nothing trains on unvalidated data")
    try:
        verdict = json.loads((project / report).read_text())
    except (OSError, ValueError) as exc:
        raise BadPath(f"validation_report: {report} is not a readable report ({type(exc).__name__}); run "
                      "`dvc repro` (stage validate)") from None
    if verdict.get("success") is not True:
        failures = ", ".join(f"{f.get('expectation')}({f.get('column') or 'table'})" for f in verdict.get("failures", [])[:3])
        raise BadPath(f"validation_report: {report} says the data failed ({failures or 'no detail'}); fix the data first")


@bp.get(f"/datasets/<{ID}:dataset_id>")
@login_required
def dataset_page(dataset_id: int):
    dataset = dataset_for(dataset_id, "read")
    grants = db.session.scalars(db.select(Grant).where(Grant.dataset_id == dataset.id)).all()
    # Without storage (the embedded set-up, or S3 down) the page still shows what the database
    # knows of the dataset; only its files and transfers need the store.
    try:
        objects, unreachable = storage().list(dataset.prefix), None
    except StorageUnavailable as exc:
        objects, unreachable = [], str(exc)
    return answer({}, "dataset.html", dataset=dataset, level=level_of(current_user, dataset),
                  objects=objects, unreachable=unreachable, grants=grants)


@bp.get(f"/api/datasets/<{ID}:dataset_id>/objects")
@login_required
def api_objects(dataset_id: int):
    return answer(storage().list(dataset_for(dataset_id, "read").prefix))


def _presign(dataset_id: int, path: str, direction: str) -> dict:
    dataset = dataset_for(dataset_id, "write" if direction == "upload" else "read")
    store = storage()
    key = object_key(dataset, path)
    url = store.upload_url(key) if direction == "upload" else store.download_url(key)
    audit(f"object.{direction}", f"s3://{store.bucket}/{key}", dataset=dataset.name)
    return {"url": url, "method": "PUT" if direction == "upload" else "GET", "key": key, "expires_in": store.expires_s}


@bp.post(f"/api/datasets/<{ID}:dataset_id>/upload-url")
@login_required
def api_upload_url(dataset_id: int):
    return answer(_presign(dataset_id, text(payload(), "path"), "upload"))


@bp.post(f"/api/datasets/<{ID}:dataset_id>/download-url")
@login_required
def api_download_url(dataset_id: int):
    return answer(_presign(dataset_id, text(payload(), "path"), "download"))


@bp.get(f"/datasets/<{ID}:dataset_id>/download")
@login_required
def download(dataset_id: int):
    # A redirect to S3: the browser fetches the bytes, the portal never streams them.
    return redirect(_presign(dataset_id, request.args.get("path", ""), "download")["url"])


@bp.route(f"/datasets/<{ID}:dataset_id>/grants", methods=["POST"])
@bp.route(f"/api/datasets/<{ID}:dataset_id>/grants", methods=["GET", "POST"], endpoint="api_grants")
@login_required
def grants(dataset_id: int):
    dataset = dataset_for(dataset_id, "manage")
    if request.method == "GET":
        rows = db.session.scalars(db.select(Grant).where(Grant.dataset_id == dataset.id)).all()
        return answer([{"id": g.id, "user": g.user.username if g.user else None,
                        "group": g.group.name if g.group else None, "level": g.level} for g in rows])
    data = payload()
    level, user_name, group_name = text(data, "level"), text(data, "user"), text(data, "group")
    if level not in LEVELS:
        raise BadPath(f"level: expected one of {list(LEVELS)}, got {level[:20]!r}")
    user = db.session.scalar(db.select(User).where(User.username == user_name)) if user_name else None
    group = db.session.scalar(db.select(Group).where(Group.name == group_name)) if group_name else None
    if (user is None) == (group is None):
        raise BadPath("grant: name exactly one existing user or group")
    grant = db.session.scalar(db.select(Grant).where(
        Grant.dataset_id == dataset.id, Grant.user_id == (user.id if user else None),
        Grant.group_id == (group.id if group else None))) or Grant(dataset_id=dataset.id, user=user, group=group)
    grant.level = level
    db.session.add(grant)
    db.session.commit()
    audit("grant", dataset.name, principal=user.username if user else group.name, level=level)
    return answer({"id": grant.id, "level": level}, status=201, to=url_for("datasets.dataset_page", dataset_id=dataset.id))


@bp.route(f"/datasets/<{ID}:dataset_id>/grants/<{ID}:grant_id>/revoke", methods=["POST"])
@bp.route(f"/api/datasets/<{ID}:dataset_id>/grants/<{ID}:grant_id>", methods=["DELETE"], endpoint="api_revoke")
@login_required
def revoke(dataset_id: int, grant_id: int):
    dataset = dataset_for(dataset_id, "manage")
    grant = db.session.get(Grant, grant_id)
    if grant is None or grant.dataset_id != dataset.id:
        abort(404)
    principal = grant.user.username if grant.user else grant.group.name
    db.session.delete(grant)
    db.session.commit()
    audit("revoke", dataset.name, principal=principal, level=grant.level)
    return ("", 204) if wants_json() else redirect(url_for("datasets.dataset_page", dataset_id=dataset.id))
