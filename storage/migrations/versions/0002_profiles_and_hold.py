"""Protocol profiles and held deliveries: the called AE title of each received instance, the profile
each job was planned with and why, and why a job's deliveries are held (a plan failing a priority-1
goal with ``planning.when_p1_fails = "hold"``, until ``airt jobs release``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Four nullable columns; existing rows keep NULL (received before profiles; nothing held)."""
    op.add_column("instances", sa.Column("called_ae_title", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("profile", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("profile_reason", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("hold_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop the four columns."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("hold_reason")
        batch.drop_column("profile_reason")
        batch.drop_column("profile")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("called_ae_title")
