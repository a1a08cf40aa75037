"""Alembic migrations of the jobs database, run by ``peftkit.jobs.db.open_database``."""
