"""The first schema: files, jobs, events, checkpoints.

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
    op.create_table(
        "peftkit_files",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("filename", sa.String(500), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
    )
    op.create_index("ix_peftkit_files_owner", "peftkit_files", ["owner"])
    op.create_table(
        "peftkit_jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("model_path", sa.String(1000), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64)),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("meta", sa.JSON),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("method", sa.JSON, nullable=False),
        sa.Column("peftkit", sa.JSON, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("error", sa.JSON),
        sa.Column("fine_tuned_model", sa.String(500)),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("finished_at", sa.Integer),
        sa.Column("trained_tokens", sa.Integer),
        sa.Column("adapter_dir", sa.String(1000)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("pause_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("claim", sa.String(64)),
        sa.Column("worker", sa.String(200)),
        sa.Column("lease_until", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_peftkit_jobs_owner", "peftkit_jobs", ["owner"])
    op.create_index("ix_peftkit_jobs_status", "peftkit_jobs", ["status"])
    op.create_table(
        "peftkit_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("peftkit_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16)),
        sa.Column("step", sa.Integer),
        sa.Column("data", sa.JSON),
    )
    op.create_index("ix_peftkit_events_job_id", "peftkit_events", ["job_id"])
    op.create_table(
        "peftkit_checkpoints",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("peftkit_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
    )
    op.create_index("ix_peftkit_checkpoints_job_id", "peftkit_checkpoints", ["job_id"])


def downgrade() -> None:
    for table in ("peftkit_checkpoints", "peftkit_events", "peftkit_jobs", "peftkit_files"):
        op.drop_table(table)
