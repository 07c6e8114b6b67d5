"""Baseline: the schema the node created before it had migrations (studies, series, instances, jobs,
job_instances, job_events, deliveries, node_events). A database without a version table but with
these tables is stamped with this revision and upgraded from it.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: such databases were created whole by ``Base.metadata.create_all``."""


def downgrade() -> None:
    """Nothing below the baseline."""
