"""Alembic revisions of the search catalog, oldest first."""
