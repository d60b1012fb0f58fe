"""Bring a catalog's schema to the newest Alembic revision: `python -m search_service.migrate`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from vpm_common.logs import configure_logging
from vpm_common.settings import SettingsError, load_settings, setting

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "storage" / "migrations"
# Any constant: PostgreSQL advisory lock that keeps two starting services from
# migrating the same catalog at once.
_PG_LOCK = 0x76706D31


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade_to_head(engine: sa.Engine) -> str:
    """Apply every pending revision in one transaction; return the revision now current."""
    config = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        return MigrationContext.configure(conn).get_current_revision() or ""


@dataclass(frozen=True)
class MigrateSettings:
    catalog_url: str = setting(
        "sqlite:///data/catalog.db",
        "SQLAlchemy URL of the catalog to migrate",
        env="VPM_CATALOG_URL",
    )
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def main(argv: Sequence[str] | None = None) -> int:
    from search_service.storage.catalog import create_catalog_engine, display_url

    try:
        settings = load_settings(
            MigrateSettings, "VPM_SEARCH_", argv, description=__doc__, prog="search_service.migrate"
        )
    except SettingsError as err:
        print(f"search_service.migrate: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    engine = create_catalog_engine(settings.catalog_url)
    try:
        revision = upgrade_to_head(engine)
    finally:
        engine.dispose()
    logger.info("catalog %s is at revision %s", display_url(engine.url), revision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
