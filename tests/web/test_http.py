"""The page over real HTTP: its JSON API against a real search server, uploads, headers."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from search_service.engine import SearchEngine
from search_service.models import Product
from search_service.storage.catalog import Catalog
from tests import images
from tests.search.conftest import RunningSearch, brute_force, random_catalog, serve_engine
from tests.support import ServerThread, free_port
from tests.web.conftest import RunningPage, multipart
from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from web import api
from web.errors import SEARCH_DOWN

DIM = 16
COUNT = 300


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSearch]:
    """A real search server over COUNT products, most with an image path, a few with a URL."""
    folder = tmp_path_factory.mktemp("search")
    engine = SearchEngine(Catalog.open(f"sqlite:///{folder}/catalog.db"), folder / "data")
    engine.load()
    products, vectors = random_catalog(COUNT, DIM, seed=5)
    attributes = {0: {"image_url": "https://cdn.example/p0.jpg"},
                  1: {"image_url": "javascript:alert(1)"}, 2: {}}  # fmt: skip
    products = [
        dataclasses.replace(
            p, attributes={**p.attributes, **attributes.get(i, {"image_path": f"shop/{p.id}.jpg"})}
        )
        for i, p in enumerate(products)
    ]
    engine.upsert_products(products, vectors)
    running = serve_engine(engine)
    running.products, running.vectors = products, vectors
    yield running
    running.stop()
    engine.close()


@pytest.fixture
def page(
    search: RunningSearch, start_page: Callable[..., RunningPage], tmp_path: Path
) -> RunningPage:
    return start_page(search=search.thread.target, images=tmp_path)


def test_more_like_this_is_the_exact_search_without_the_product(
    page: RunningPage, search: RunningSearch
) -> None:
    reply = page.get("/api/search?id=p7&top_k=12")
    assert reply.status == 200, reply.body
    found = reply.json()
    rows, scores = brute_force(search.vectors, search.vectors[7], 13)
    expected = [search.products[r].id for r in rows if r != 7][:12]
    assert [m["id"] for m in found["matches"]] == expected
    np.testing.assert_allclose([m["score"] for m in found["matches"]], scores[1:], atol=1e-4)
    assert found["more"] is True and found["took_ms"] >= 0 and found["random_weights"] is False
    second = page.get("/api/search?id=p7&top_k=6&offset=6").json()
    assert [m["id"] for m in second["matches"]] == expected[6:]


def test_filters_and_min_score_narrow_the_results(page: RunningPage, search: RunningSearch) -> None:
    found = page.get("/api/search?id=p7&top_k=50&filter.gender=Women&filter.season=Winter").json()
    assert found["matches"]
    assert all((m["gender"], m["season"]) == ("Women", "Winter") for m in found["matches"])
    floor = found["matches"][3]["score"]
    above = page.get(f"/api/search?id=p7&top_k=50&filter.gender=Women&min_score={floor}").json()
    assert above["matches"] and all(m["score"] >= floor - 1e-4 for m in above["matches"])


def test_pictures_come_from_image_url_or_the_thumbnail_route(page: RunningPage) -> None:
    shown = {}
    for product_id in ("p0", "p1", "p2", "p3"):
        shown[product_id] = page.get(f"/api/products/{product_id}").json()["thumbnail"]
    assert shown == {"p0": "https://cdn.example/p0.jpg", "p1": None, "p2": None,
                     "p3": "/thumbnails/shop/p3.jpg"}  # fmt: skip


def test_an_images_folder_that_appears_later_serves_thumbnails_then(
    search: RunningSearch, start_page: Callable[..., RunningPage], tmp_path: Path
) -> None:
    # As in Kubernetes, where the page may start before the catalog volume is filled.
    folder = tmp_path / "not-yet"
    page = start_page(search=search.thread.target, images=folder)
    assert page.get("/healthz").status == 200
    assert page.get("/thumbnails/shop/p3.jpg").status == 404
    (folder / "shop").mkdir(parents=True)
    (folder / "shop" / "p3.jpg").write_bytes(images.jpeg(200, 100))
    reply = page.get("/thumbnails/shop/p3.jpg")
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg"


def test_facets_count_what_the_catalog_holds(page: RunningPage, search: RunningSearch) -> None:
    reply = page.get("/api/facets?field=base_colour&field=year&filter.gender=Men").json()
    men = [p for p in search.products if p.gender == "Men"]
    assert reply["products"] == len(men)
    colours = {v["value"]: v["count"] for v in reply["facets"][0]["values"]}
    assert colours == Counter(p.base_colour for p in men)
    years = {v["value"]: v["count"] for v in reply["facets"][1]["values"]}
    assert years == Counter(str(p.year) for p in men)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/search?id=nope", 404, "no product 'nope'"),
        ("/api/search?text=shoes", 503, "no encoder is configured"),
        ("/api/search", 400, "give exactly one of a photo, a text or a product id"),
        ("/api/search?id=p1&text=x", 400, "give exactly one"),
        ("/api/search?id=p1&top_k=0", 400, "top_k: expected a whole number from 1 to 100"),
        ("/api/search?id=p1&top_k=ten", 400, "top_k: expected a whole number"),
        ("/api/search?id=p1&offset=%C2%B2", 400, "offset: expected a whole number"),  # "²"
        ("/api/search?id=p1&min_score=2", 400, "min_score: expected a number from -1 to 1"),
        ("/api/search?id=p1&filter.colour=Red", 400, "filters: unknown key 'colour'"),
        ("/api/facets?field=name", 400, "fields: 'name' is not a facet"),
        ("/api/products/nope", 404, "no product 'nope'"),
    ],
)
def test_bad_queries_get_a_message(page: RunningPage, path: str, status: int, message: str) -> None:
    reply = page.get(path)
    assert reply.status == status, reply.body
    assert message in reply.message
    assert reply.headers["content-type"] == "application/json"


def test_the_api_is_read_only(page: RunningPage) -> None:
    for method, path in [("PUT", "/api/search"), ("DELETE", "/api/products/p1"),
                         ("POST", "/api/products/p1"), ("POST", "/api/facets")]:  # fmt: skip
        assert page.request(method, path).status == 405, (method, path)
    assert page.request("POST", "/api/upsert").status == 404


def test_security_headers_and_no_inline_script(page: RunningPage) -> None:
    html = page.get("/")
    assert html.status == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    text = html.body.decode()
    for tag in re.findall(r"<script\b[^>]*>", text):
        assert 'src="/static/' in tag, tag
    assert not re.search(r"<script\b[^>]*>(?!</script>)", text), "inline script"
    assert not re.search(r"\son\w+\s*=", text) and " style=" not in text
    for path in ("/", "/static/app.js", "/api/status", "/api/search?id=p1", "/thumbnails/x.jpg"):
        reply = page.get(path)
        assert reply.headers["x-content-type-options"] == "nosniff", path
        assert reply.headers["content-security-policy"] == csp, path
        assert reply.headers["referrer-policy"] == "no-referrer", path
    assert page.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    for path in ("/api/status", "/api/search?id=p1", "/api/search?id=nope", "/api/facets"):
        assert page.get(path).headers["cache-control"] == "no-store", path
    assert "server" not in html.headers


def test_status_tells_random_weights_by_the_encoders_model_id(
    page: RunningPage, encoder_server: ServerThread
) -> None:
    status = page.get("/api/status").json()
    assert status["products"] == COUNT and status["random_weights"] is False
    # The oracle: the encoder's own ModelInfo flag, for the model id the page reads.
    channel_stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(encoder_server.target))
    info = channel_stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30)
    assert info.random_weights is True and api.random_weights(info.model_id) is True
    assert api.random_weights("ViT-B-32/laion2b_s34b_b79k") is False


def test_a_page_whose_search_service_is_down_still_loads_and_says_so(
    start_page: Callable[..., RunningPage],
) -> None:
    page = start_page(search=f"127.0.0.1:{free_port()}", timeout_s=5)
    assert page.get("/").status == 200 and page.get("/static/app.js").status == 200
    assert page.get("/healthz").status == 200
    for path in ("/api/status", "/api/facets", "/api/search?id=p1"):
        reply = page.get(path)
        assert (reply.status, reply.message) == (503, SEARCH_DOWN), path


# -- uploads ---------------------------------------------------------------------------


@pytest.fixture
def with_encoder(
    tmp_path: Path, encoder_server: ServerThread, start_page: Callable[..., RunningPage]
) -> RunningPage:
    """A page over a search service whose encoder is real (the tiny model): vectors of its
    model, so an uploaded photo is really encoded and searched."""
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    engine.load()
    search = serve_engine(engine, encoders=(encoder_server.target,))
    stub = encoder_pb2_grpc.EncoderStub(__import__("grpc").insecure_channel(encoder_server.target))
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30)
    pictures = [images.jpeg(320, 240, seed=s) for s in range(3)]
    encoded = stub.EncodeImages(
        iter(encoder_pb2.ImageItem(id=str(s), data=p) for s, p in enumerate(pictures)), timeout=60
    )
    vectors = np.array([list(item.vector) for item in encoded], dtype=np.float32)
    products = [Product(f"shot{s}", name=f"Shot {s}", model_id=info.model_id) for s in range(3)]
    engine.upsert_products(products, vectors)
    page = start_page(search=search.thread.target, max_upload_bytes=200_000,
                      max_upload_pixels=1_000_000)  # fmt: skip
    page.pictures = pictures
    yield page
    search.stop()
    engine.close()


def upload(page: RunningPage, data: bytes | None, **fields: str) -> object:
    body, headers = multipart(fields, data)
    return page.request("POST", "/api/search", body=body, headers=headers)


def test_an_uploaded_photo_finds_its_product_first(with_encoder: RunningPage) -> None:
    reply = upload(with_encoder, with_encoder.pictures[1], top_k="3")
    assert reply.status == 200, reply.body
    found = reply.json()
    assert found["matches"][0]["id"] == "shot1" and found["matches"][0]["score"] > 0.99
    assert found["random_weights"] is True


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"just some text, not a picture\n" * 10, 400, "not an image the page can read"),
        (b"", 400, "the file is empty"),
        (images.jpeg(320, 240)[:600], 400, "image"),  # a valid header, then cut: corrupt
        (images.encode(images.picture(1500, 1000), "PNG"), 413, "over the limit of 0.2 MB"),
        (images.png_declaring(2000, 1000), 413, "2000x1000 = 2.0 megapixels, over the limit"),
    ],
    ids=["text", "empty", "corrupt", "too-many-bytes", "too-many-pixels"],
)
def test_bad_photos_get_a_message(
    with_encoder: RunningPage, data: bytes, status: int, message: str
) -> None:
    reply = upload(with_encoder, data)
    assert reply.status == status, reply.body
    assert message in reply.message
    assert "Traceback" not in reply.message and "/" not in reply.message.split("(")[0][:8]


def test_malformed_uploads_get_a_message(with_encoder: RunningPage) -> None:
    post = with_encoder.request
    reply = post("POST", "/api/search", body=b"raw bytes", headers={"Content-Type": "image/jpeg"})
    assert reply.status == 400 and "multipart/form-data" in reply.message
    reply = post("POST", "/api/search", body=b"--x\r\nbroken",
                 headers={"Content-Type": "multipart/form-data"})  # fmt: skip
    assert reply.status == 400 and "malformed" in reply.message
    body, headers = multipart({"text": "shoes"}, None)
    reply = post("POST", "/api/search", body=body, headers=headers)
    assert reply.status == 400 and "no photo in the upload" in reply.message
    huge = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**9)}
    reply = post("POST", "/api/search", body=b"", headers=huge)
    assert reply.status == 413 and "over the limit" in reply.message
