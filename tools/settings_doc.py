"""`python -m tools.settings_doc [--write]`: the configuration tables the README carries.

Without arguments it prints them; with --write it replaces them in README.md
(each table follows its `### <title>` heading up to the next blank line).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from encoder_service.settings import ENV_PREFIX as ENCODER_PREFIX
from encoder_service.settings import EncoderSettings
from indexer.settings import ENV_PREFIX as INDEXER_PREFIX
from indexer.settings import IndexerSettings
from search_service.settings import SearchSettings
from vpm_common.settings import markdown_table
from web.settings import ENV_PREFIX as WEB_PREFIX
from web.settings import WebSettings

SEARCH_PREFIX = "VPM_SEARCH_"  # the catalog URL's variable, VPM_CATALOG_URL, is set on its field
README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = (
    ("Encoder (`python -m encoder_service`)", EncoderSettings, ENCODER_PREFIX),
    ("Search (`python -m search_service`)", SearchSettings, SEARCH_PREFIX),
    ("Indexer (`python -m indexer`)", IndexerSettings, INDEXER_PREFIX),
    ("Search page (`python -m web`)", WebSettings, WEB_PREFIX),
)


def tables() -> dict[str, str]:
    return {title: markdown_table(cls, prefix) for title, cls, prefix in SECTIONS}


def with_tables(readme: str) -> str:
    for title, table in tables().items():
        pattern = re.compile(rf"(### {re.escape(title)}\n\n)(\|.*?\n)(?=\n|\Z)", re.S)
        readme, found = pattern.subn(lambda m, t=table: m.group(1) + t + "\n", readme)
        if not found:
            raise SystemExit(f"README.md has no table under '### {title}'")
    return readme


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(with_tables(README.read_text()))
    else:
        for title, table in tables().items():
            print(f"### {title}\n\n{table}\n")
