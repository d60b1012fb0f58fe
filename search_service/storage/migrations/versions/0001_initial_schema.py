"""Initial catalog schema: catalog_state, products (with filter indexes) and deletions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The schema is written out here rather than imported from search_service.storage.schema,
so this revision keeps meaning the same thing when the schema moves on.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEY_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
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
    state = op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("catalog_id", sa.String(36), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("next_key", sa.BigInteger, nullable=False),
        sa.Column("model_id", sa.String(256), nullable=True),
        sa.Column("dim", sa.Integer, nullable=True),
    )
    op.bulk_insert(state, [{"id": 1, "catalog_id": str(uuid.uuid4()), "version": 0, "next_key": 1}])
    op.create_table(
        "products",
        sa.Column("row_key", KEY_TYPE, primary_key=True, autoincrement=False),
        sa.Column("product_id", sa.String(256), nullable=False, unique=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("gender", sa.String, nullable=False),
        sa.Column("master_category", sa.String, nullable=False),
        sa.Column("sub_category", sa.String, nullable=False),
        sa.Column("article_type", sa.String, nullable=False),
        sa.Column("base_colour", sa.String, nullable=False),
        sa.Column("season", sa.String, nullable=False),
        sa.Column("year", sa.Integer, nullable=False),
        sa.Column("usage", sa.String, nullable=False),
        sa.Column("category", sa.String, nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_products_version", "products", ["version"])
    for name in FILTERABLE:
        op.create_index(f"ix_products_{name}", "products", [name])
    op.create_table(
        "deletions",
        sa.Column("row_key", KEY_TYPE, primary_key=True, autoincrement=False),
        sa.Column("product_id", sa.String(256), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_deletions_version", "deletions", ["version"])


def downgrade() -> None:
    op.drop_table("deletions")
    op.drop_table("products")
    op.drop_table("catalog_state")
