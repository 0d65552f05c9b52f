"""The audit log: who did what, when, and how it ended (administrators only), filtered by user,
model (or any target) and action."""
from __future__ import annotations

from flask import Blueprint, request

from portal.db import AuditEvent, db
from portal.web import admin_only, answer

bp = Blueprint("audit", __name__)
FILTERS = ("user", "action", "target")


@bp.get("/audit")
@bp.get("/api/audit", endpoint="api_audit")
@admin_only
def audit_log():
    chosen = {key: request.args.get(key, "").strip()[:200] for key in FILTERS}
    query = db.select(AuditEvent).order_by(AuditEvent.id.desc()).limit(500)
    if chosen["user"]:
        query = query.where(AuditEvent.user == chosen["user"])
    if chosen["action"]:
        query = query.where(AuditEvent.action == chosen["action"])
    if chosen["target"]:  # a model name finds every version of it
        query = query.where(AuditEvent.target.contains(chosen["target"], autoescape=True))
    events = db.session.scalars(query).all()
    actions = db.session.scalars(db.select(AuditEvent.action).distinct().order_by(AuditEvent.action)).all()
    return answer([{"time": e.time.isoformat(), "user": e.user, "action": e.action, "target": e.target,
                    "outcome": e.outcome, "detail": e.detail} for e in events], "audit.html", events=events,
                  chosen=chosen, actions=actions)
