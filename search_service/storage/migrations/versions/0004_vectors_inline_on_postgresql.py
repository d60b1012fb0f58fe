"""On PostgreSQL, keep product rows (and so their vectors) inline up to a page.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

A row with a 512-d float32 vector is ~2.3 KB, past PostgreSQL's default
toast_tuple_target (~2 KB): each insert tried to compress the vector (random
floats do not compress) and moved it out to the TOAST table, with its own
index. With the target at a page's worth (8160, the most PostgreSQL allows),
rows up to it stay in the table as they are; larger ones are toasted as
before. New rows only (an update writes a new row): rows already written stay
where they are. This was most of a bulk upsert's time on PostgreSQL
(BENCHMARKS.md, ingest into PostgreSQL). Other databases: nothing.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# PostgreSQL's TOAST_TUPLE_TARGET_MAIN: the largest value the option takes.
INLINE_BYTES = 8160


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE products SET (toast_tuple_target = {INLINE_BYTES})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE products RESET (toast_tuple_target)")
