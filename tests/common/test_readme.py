"""The README stays true: its commands exist and its configuration tables match the code."""

from __future__ import annotations

import re

from tools.settings_doc import README, with_tables


def test_configuration_tables_match_the_settings() -> None:
    readme = README.read_text()
    assert with_tables(readme) == readme, (
        "README tables are stale: run python -m tools.settings_doc --write"
    )


def test_the_two_commands_and_every_make_target_named_exist() -> None:
    readme = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z-]+)`", readme)) | set(
        re.findall(r"^make ([a-z-]+)", readme, re.M)
    )
    assert {"run", "test"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {named - targets}"
