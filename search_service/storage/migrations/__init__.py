"""Alembic migrations of the search catalog; run them with `python -m search_service.migrate`."""
