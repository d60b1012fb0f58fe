"""Deletions log retention: when each deletion happened, and how far the log was pruned.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01

- `deletions.deleted_at`: Unix seconds of the deletion, so the log can keep a
  retention period; rows already there count as deleted now, so nothing a
  reader may still need is pruned early.
- `catalog_state.pruned_version`: every deletion at or below it may be gone
  from the log, so an index older than it cannot catch up and is rebuilt.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch_alter_table: SQLite adds a NOT NULL column with a default in place; the
    # server default then stays, harmless, as the schema's record of this migration.
    with op.batch_alter_table("deletions") as batch:
        batch.add_column(
            sa.Column("deleted_at", sa.BigInteger, nullable=False, server_default=str(_now()))
        )
        batch.create_index("ix_deletions_deleted_at", ["deleted_at"])
    with op.batch_alter_table("catalog_state") as batch:
        batch.add_column(
            sa.Column("pruned_version", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.drop_column("pruned_version")
    with op.batch_alter_table("deletions") as batch:
        batch.drop_index("ix_deletions_deleted_at")
        batch.drop_column("deleted_at")


def _now() -> int:
    return int(time.time())
