"""The audit log: who did what, when, and how it ended (administrators only)."""
from __future__ import annotations

from flask import Blueprint

from portal.db import AuditEvent, db
from portal.web import admin_only, answer

bp = Blueprint("audit", __name__)


@bp.get("/audit")
@bp.get("/api/audit", endpoint="api_audit")
@admin_only
def audit_log():
    events = db.session.scalars(db.select(AuditEvent).order_by(AuditEvent.id.desc()).limit(500)).all()
    return answer([{"time": e.time.isoformat(), "user": e.user, "action": e.action, "target": e.target,
                    "outcome": e.outcome, "detail": e.detail} for e in events], "audit.html", events=events)
