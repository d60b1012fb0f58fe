"""`python -m demo.query`: bad input is a usage error naming the flag, not a traceback.

Its successful queries are run as the README writes them (tests/e2e/test_readme.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from demo import query
from search_service.engine import SearchEngine
from search_service.storage.catalog import Catalog
from tests.search.conftest import random_catalog, serve_engine
from tests.support import free_port


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        query.main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("term", ["gender", "=Women"])
def test_a_filter_without_field_and_value_is_a_usage_error(
    term: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(["--id", "1", "--filter", term], capsys)
    assert f"argument --filter: expected FIELD=VALUE, e.g. gender=Women; got {term!r}" in error


def test_an_unreadable_image_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(["--image", str(tmp_path / "none.jpg")], capsys)
    assert f"--image: cannot read {tmp_path / 'none.jpg'}: No such file or directory" in error


def test_a_service_that_does_not_answer_fails_with_its_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert query.main(["--id", "1", "--search", f"127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err.startswith("search failed: UNAVAILABLE: ")


def test_tls_alone_speaks_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A plaintext service: found without --tls; with it, the handshake fails, as it does
    # (there trusting the system's roots) against a service whose certificate they sign.
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    engine.load()
    engine.upsert_products(*random_catalog(20, 8))
    running = serve_engine(engine)
    try:
        target = ["--id", "p1", "--top-k", "3", "--search", running.thread.target]
        assert query.main(target) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2 + 3  # header, rule, 3 matches
        assert query.main([*target, "--tls"]) == 1
        assert capsys.readouterr().err.startswith("search failed: UNAVAILABLE: ")
    finally:
        running.stop()
        engine.close()
