"""Alembic's environment for durable-tiers' migrations: they run on the connection
the caller gives (see `retrier._migrations`), never on one of their own."""

from __future__ import annotations

from alembic import context

from retrier._migrations import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "durable-tiers' migrations run through `tiers db upgrade` or "
        "retrier.migrations.upgrade(connection), which give them a connection"
    )
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
