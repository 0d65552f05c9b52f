"""The portal's database (SQLAlchemy; SQLite by default, any SQLAlchemy URL): users, groups,
datasets as S3 prefixes, grants, training jobs and the audit log. Its schema changes only through
migrations (``portal/migrations``, ``python -m portal db upgrade``)."""
from __future__ import annotations

from datetime import datetime, timezone

from flask_login import UserMixin
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import JSON, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

db = SQLAlchemy()

LEVELS = ("read", "write", "manage")  # each includes the ones before it


def now() -> datetime:
    return datetime.now(timezone.utc)


class Membership(db.Model):
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id"), primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("group.id"), primary_key=True)


class Group(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class User(UserMixin, db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None: signs in through SSO only
    is_admin: Mapped[bool] = mapped_column(default=False)
    can_promote: Mapped[bool] = mapped_column(default=False)
    groups: Mapped[list[Group]] = relationship(secondary="membership")

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return bool(self.password_hash) and check_password_hash(self.password_hash, password)


class Dataset(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(512), unique=True)  # always ends with "/"
    # Where the built dataset lives in the project (DVC pipeline outputs), when it can train.
    train_path: Mapped[str | None] = mapped_column(String(512))
    validation_report: Mapped[str | None] = mapped_column(String(512))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=now)


class Grant(db.Model):
    __table_args__ = (UniqueConstraint("dataset_id", "user_id", "group_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("group.id"))
    level: Mapped[str] = mapped_column(String(8))
    dataset: Mapped[Dataset] = relationship()
    user: Mapped[User | None] = relationship()
    group: Mapped[Group | None] = relationship()


class Job(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id"))
    entry_point: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict] = mapped_column(JSON)  # the validated form
    command: Mapped[list] = mapped_column(JSON)
    # queued starting running finished failed cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued")
    backend: Mapped[str | None] = mapped_column(String(16))  # the MLflow project backend: local or slurm
    # The scheduler's handle (Slurm job id; process id under the local backend) and its last word.
    scheduler_id: Mapped[str | None] = mapped_column(String(64))
    scheduler_state: Mapped[str | None] = mapped_column(String(32))
    log_path: Mapped[str | None] = mapped_column(String(1024))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    experiment_id: Mapped[str | None] = mapped_column(String(64))
    exit_code: Mapped[int | None] = mapped_column()
    log_tail: Mapped[str | None] = mapped_column(db.Text)
    created_at: Mapped[datetime] = mapped_column(default=now)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    dataset: Mapped[Dataset] = relationship()


class ModelFamily(db.Model):
    """A model family (``<name>-backbone``, ``<name>-head``): who may train into it and promote
    it. The first portal user to train a new name owns it; a name the registry already holds
    belongs to no one until an administrator assigns it (``python -m portal create-family``)."""
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("group.id"))
    group: Mapped[Group | None] = relationship()
    created_at: Mapped[datetime] = mapped_column(default=now)


class SignInFailures(db.Model):
    """Failed sign-ins per account and per address, shared by every portal process."""
    key: Mapped[str] = mapped_column(String(128), primary_key=True)  # "user:<name>" or "addr:<ip>"
    failures: Mapped[int] = mapped_column(default=0)
    last_failure: Mapped[datetime] = mapped_column(default=now)
    locked_until: Mapped[datetime | None] = mapped_column()


class AuditEvent(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(default=now, index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(512), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok denied refused failed
    detail: Mapped[dict] = mapped_column(JSON, default=dict)

