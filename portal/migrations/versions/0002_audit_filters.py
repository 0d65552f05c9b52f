"""Indexes for the audit page's filters (by user, by action).

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_event_user", "audit_event", ["user"])
    op.create_index("ix_audit_event_action", "audit_event", ["action"])


def downgrade() -> None:
    op.drop_index("ix_audit_event_action", "audit_event")
    op.drop_index("ix_audit_event_user", "audit_event")
