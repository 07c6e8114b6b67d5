"""Alembic environment of the queue database: runs on the connection ``storage.db.init_db`` passes in
``config.attributes["connection"]`` (the node migrates its own database at start; there is no
alembic.ini). ``render_as_batch``: SQLite alters tables by copying them."""

from __future__ import annotations

from alembic import context

from storage.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
