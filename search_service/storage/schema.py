"""The catalog's tables as SQLAlchemy Core objects (the migrations create them; queries use these).

- `catalog_state`: one row holding the catalog version, the next row key,
  the model of the stored vectors and how far the deletions log was pruned.
  Every write transaction updates it first, so writers (threads or
  processes) commit in version order.
- `products`: one row per product: metadata, image hash, model, vector (float32
  bytes) and the version of its last change.
- `deletions`: the key, version and time of each deleted product, so an index
  can catch up from a snapshot with the changes since its version; rows past
  the retention period are pruned (see Catalog.prune_deletions).
"""

from __future__ import annotations

import sqlalchemy as sa

# SQLite makes an INTEGER PRIMARY KEY the rowid (64-bit); BIGINT would add a second b-tree.
KEY_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

catalog_state = sa.Table(
    "catalog_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("catalog_id", sa.String(36), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("next_key", sa.BigInteger, nullable=False),
    sa.Column("model_id", sa.String(256), nullable=True),
    sa.Column("dim", sa.Integer, nullable=True),
    # Deletions at or below this version may be pruned from the log.
    sa.Column("pruned_version", sa.BigInteger, nullable=False, server_default="0"),
)

products = sa.Table(
    "products",
    metadata,
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
    # JSON object text with sorted keys, so equal attributes compare equal as text.
    sa.Column("attributes", sa.Text, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("model_id", sa.String(256), nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False, index=True),
)

deletions = sa.Table(
    "deletions",
    metadata,
    sa.Column("row_key", KEY_TYPE, primary_key=True, autoincrement=False),
    sa.Column("product_id", sa.String(256), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False, index=True),
    # Unix seconds, from the deleting process's clock: retention needs no finer.
    sa.Column("deleted_at", sa.BigInteger, nullable=False, index=True),
)
