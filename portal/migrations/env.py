"""Alembic's environment for the portal's tables: run through ``portal.migrate`` (which hands it a
connection), never with a URL of its own."""
from alembic import context

from portal.db import db

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=db.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
