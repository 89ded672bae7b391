"""durable-tiers' database migrations (Alembic), shipped with the package.

They keep their own version table, `tiers_alembic_version`, so they never meet an
app's own Alembic history. A `Retrier` applies them when it starts (the embedded
default needs no command); teams that migrate in a deploy step run `tiers db upgrade`,
or call `upgrade` from their own Alembic `env.py`:

    from retrier.migrations import upgrade

    def run_migrations_online() -> None:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()          # the app's own
                upgrade(connection)               # durable-tiers', in the same transaction
"""

from __future__ import annotations

from .._migrations import VERSION_TABLE, Branch, Migrations, upgrade

__all__ = ["VERSION_TABLE", "Branch", "Migrations", "upgrade"]
