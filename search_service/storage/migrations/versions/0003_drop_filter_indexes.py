"""Drop the products table's nine filter-column indexes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

The service filters in memory (search_service.index.filters) and reads products by
key or by version, never by a filter column; the indexes only cost every write
(about half of SQLite's time in a bulk upsert: BENCHMARKS.md, issue 15). A report
that wants one can create it.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out, as in 0001: a revision keeps meaning the same when the schema moves on.
FILTERABLE = (
    "gender",
    "master_category",
    "sub_category",
    "article_type",
    "base_colour",
    "season",
    "year",
    "usage",
    "category",
)


def upgrade() -> None:
    for name in FILTERABLE:
        op.drop_index(f"ix_products_{name}", table_name="products")


def downgrade() -> None:
    for name in FILTERABLE:
        op.create_index(f"ix_products_{name}", "products", [name])
