"""Fixtures of the security tests: a throwaway PKI, tokens, and TLS encoders in-process."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search_service.encoders.embedder import QueryEmbedder
from search_service.engine import SearchEngine
from search_service.rpc.server import SearchApp, create_server
from search_service.settings import SearchSettings
from search_service.storage.catalog import Catalog
from tests.conftest import start_encoder
from tests.security.pki import Authority, Issued
from tests.support import ServerThread
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.security import PLAINTEXT, ClientSecurity


@dataclass(frozen=True)
class Pki:
    """A CA with a server certificate (localhost, 127.0.0.1, ::1) and a client certificate,
    and a second, unrelated CA with its own: what an impostor would hold."""

    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    other_server: Issued
    other_client: Issued

    def client_security(self, token: str = "", cert: bool = True) -> ClientSecurity:
        """A client trusting our CA, showing our client certificate (if `cert`), sending `token`."""
        return ClientSecurity.load(
            ca=self.ca,
            cert=self.client.cert if cert else None,
            key=self.client.key if cert else None,
            token=token,
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ours, theirs = Authority.create(folder, "ours"), Authority.create(folder, "theirs")
    return Pki(
        ours.cert,
        ours.issue_server("server", ("localhost", "encoder.vpm.test")),
        ours.issue_client("client"),
        theirs.cert,
        theirs.issue_server("server"),
        theirs.issue_client("client"),
    )


def new_token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def token_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a token file holding `tokens`, one per line (a comment line first)."""

    def write(*tokens: str, name: str = "tokens") -> Path:
        path = tmp_path / name
        path.write_text("# accepted tokens\n" + "".join(f"{token}\n" for token in tokens))
        return path

    return write


@dataclass(frozen=True)
class Locked:
    """A tiny encoder that asks for everything: TLS, a client certificate from our CA, a token.

    It accepts `tokens` (two from its token file, then the one from its environment)."""

    thread: ServerThread
    tokens: tuple[str, str, str]

    @property
    def target(self) -> str:
        return self.thread.target


@pytest.fixture(scope="session")
def locked_encoder(
    pki: Pki, tiny_settings: Callable[..., object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Locked]:
    tokens = (new_token(), new_token(), new_token())
    path = tmp_path_factory.mktemp("tokens") / "encoder-tokens"
    path.write_text(f"{tokens[0]}\n\n# the next one is for the indexer\n{tokens[1]}\n")
    thread, app = start_encoder(
        tiny_settings(
            tls_cert=pki.server.cert,
            tls_key=pki.server.key,
            tls_client_ca=pki.ca,
            auth_token_file=path,
            auth_token=tokens[2],
        )
    )
    yield Locked(thread, tokens)
    thread.stop(0)
    app.engine.close(drain=False)


@dataclass
class RunningSearch:
    thread: ServerThread
    engine: SearchEngine

    @property
    def target(self) -> str:
        return self.thread.target


@pytest.fixture
def secure_search(tmp_path: Path) -> Iterator[Callable[..., RunningSearch]]:
    """Factory: a real search server in-process over a fresh SQLite catalog, its settings
    overridden by keywords, calling `encoders` with `encoder_security`."""
    running: list[RunningSearch] = []

    def make(
        encoders: tuple[str, ...] = (),
        encoder_security: ClientSecurity = PLAINTEXT,
        **overrides: object,
    ) -> RunningSearch:
        folder = tmp_path / f"search-{len(running)}"
        settings = SearchSettings(host="127.0.0.1", port=0, metrics_port=0, **overrides)
        holder: list[SearchEngine] = []

        async def build():  # noqa: ANN202 - ServerThread's builder
            # The encoder pool's channels belong to the serving event loop, as in main.
            pool = (
                EncoderPool(encoders, timeout_s=30, security=encoder_security) if encoders else None
            )
            engine = SearchEngine(
                Catalog.open(f"sqlite:///{folder}/catalog.db"), folder, embedder=QueryEmbedder(pool)
            )
            engine.load()
            holder.append(engine)
            return await create_server(settings, SearchApp(engine))

        folder.mkdir()
        thread = ServerThread(build)
        thread.start()
        running.append(RunningSearch(thread, holder[0]))
        return running[-1]

    yield make
    for search in running:
        search.thread.run(search.engine.embedder.close())
        search.thread.stop(0)
        search.engine.close()
