"""The portal's schema under Alembic: ``python -m portal db upgrade`` (``current``, ``heads``).

A database made by a release before migrations (tables from ``create_all``, no
``alembic_version``) is recognised and stamped at the first revision, then upgraded, so its rows
stay. The embedded SQLite database is upgraded when the portal starts; a shared one only by the
command, so several workers never migrate at once: a portal whose database is behind refuses to
start and says what to run.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from dinomx.errors import UserError

MIGRATIONS = Path(__file__).with_name("migrations")
FIRST = "0001"


class SchemaBehind(UserError, RuntimeError):
    pass


def _config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(_config(None)).get_current_head()


def current(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the schema to ``revision``; returns the revision it is at now."""
    with engine.begin() as connection:
        config = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" not in tables and "user" in tables:
            command.stamp(config, FIRST)  # made by create_all before migrations existed
        command.upgrade(config, revision)
    return current(engine)


def require_current(engine: Engine) -> None:
    at, wanted = current(engine), head()
    if at != wanted:
        raise SchemaBehind(f"portal database {engine.url.render_as_string(hide_password=True)} is at revision "
                           f"{at or 'none'}, this portal needs {wanted}: run `python -m portal db upgrade`")
