"""The portal's tables as the first releases created them (``create_all``): users, groups,
datasets and grants, jobs, model families, sign-in failures, the audit log.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("group", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(64), nullable=False, unique=True))
    op.create_table("user", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("username", sa.String(64), nullable=False, unique=True),
                    sa.Column("password_hash", sa.String(256)),
                    sa.Column("is_admin", sa.Boolean(), nullable=False),
                    sa.Column("can_promote", sa.Boolean(), nullable=False))
    op.create_table("membership",
                    sa.Column("user_id", sa.Integer(), sa.ForeignKey("user.id"), primary_key=True),
                    sa.Column("group_id", sa.Integer(), sa.ForeignKey("group.id"), primary_key=True))
    op.create_table("dataset", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(64), nullable=False, unique=True),
                    sa.Column("prefix", sa.String(512), nullable=False, unique=True),
                    sa.Column("train_path", sa.String(512)),
                    sa.Column("validation_report", sa.String(512)),
                    sa.Column("created_by", sa.String(64), nullable=False),
                    sa.Column("created_at", sa.DateTime(), nullable=False))
    op.create_table("grant", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
                    sa.Column("user_id", sa.Integer(), sa.ForeignKey("user.id")),
                    sa.Column("group_id", sa.Integer(), sa.ForeignKey("group.id")),
                    sa.Column("level", sa.String(8), nullable=False),
                    sa.UniqueConstraint("dataset_id", "user_id", "group_id"))
    op.create_table("job", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("owner", sa.String(64), nullable=False),
                    sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("dataset.id"), nullable=False),
                    sa.Column("entry_point", sa.String(32), nullable=False),
                    sa.Column("parameters", sa.JSON(), nullable=False),
                    sa.Column("command", sa.JSON(), nullable=False),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("backend", sa.String(16)),
                    sa.Column("scheduler_id", sa.String(64)),
                    sa.Column("scheduler_state", sa.String(32)),
                    sa.Column("log_path", sa.String(1024)),
                    sa.Column("mlflow_run_id", sa.String(64)),
                    sa.Column("experiment_id", sa.String(64)),
                    sa.Column("exit_code", sa.Integer()),
                    sa.Column("log_tail", sa.Text()),
                    sa.Column("created_at", sa.DateTime(), nullable=False),
                    sa.Column("started_at", sa.DateTime()),
                    sa.Column("finished_at", sa.DateTime()))
    op.create_table("model_family", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(40), nullable=False, unique=True),
                    sa.Column("owner", sa.String(64), nullable=False),
                    sa.Column("group_id", sa.Integer(), sa.ForeignKey("group.id")),
                    sa.Column("created_at", sa.DateTime(), nullable=False))
    op.create_table("sign_in_failures", sa.Column("key", sa.String(128), primary_key=True),
                    sa.Column("failures", sa.Integer(), nullable=False),
                    sa.Column("last_failure", sa.DateTime(), nullable=False),
                    sa.Column("locked_until", sa.DateTime()))
    op.create_table("audit_event", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("time", sa.DateTime(), nullable=False),
                    sa.Column("user", sa.String(64), nullable=False),
                    sa.Column("action", sa.String(64), nullable=False),
                    sa.Column("target", sa.String(512), nullable=False),
                    sa.Column("outcome", sa.String(16), nullable=False),
                    sa.Column("detail", sa.JSON(), nullable=False))
    op.create_index("ix_audit_event_time", "audit_event", ["time"])


def downgrade() -> None:
    for table in ("audit_event", "sign_in_failures", "model_family", "job", "grant", "dataset", "membership", "user",
                  "group"):
        op.drop_table(table)
