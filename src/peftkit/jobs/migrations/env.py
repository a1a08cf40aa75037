"""Alembic environment: migrations run on the connection ``open_database`` hands over."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("peftkit's jobs migrations run through peftkit.jobs.db.open_database(url)")
context.configure(connection=connection, target_metadata=None, version_table="peftkit_alembic_version")
with context.begin_transaction():
    context.run_migrations()
