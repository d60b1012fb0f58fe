"""The README's query commands, run as written by bash against the services `make run`
starts, on a demo catalog: the grpcurl lines (through tests/fake_grpcurl.py, named as the
fake it is), the demo.query lines and the JSON API's curl lines. Only the addresses
differ: the services run on free ports."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from demo.catalog import generate
from tests.support import ROOT, DemoStack, demo_stack

pytestmark = pytest.mark.slow

README_ENCODER, README_SEARCH, README_WEB = "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:8080"
DEMO_PRODUCTS = 12


def readme_commands(first_words: str) -> list[str]:
    """The README's shell commands (in ```sh blocks, continuation lines joined) that begin
    with `first_words`."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    commands = []
    for block in blocks:
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            if command.startswith(first_words):
                commands.append(command.split("  #")[0].strip())
    return commands


@dataclass
class Demo:
    work: Path  # holds data/demo-catalog as `make run` makes it, and .venv: the README's cwd
    stack: DemoStack


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Demo]:
    """The services `make run` starts, holding a small demo catalog where make run puts one."""
    work = tmp_path_factory.mktemp("readme")
    catalog = generate(work / "data" / "demo-catalog", count=DEMO_PRODUCTS)
    (work / ".venv").symlink_to(Path(sys.prefix))  # the README says .venv/bin/python
    with demo_stack(work, catalog, model_cache) as stack:
        yield Demo(work, stack)


def run_in_bash(demo: Demo, command: str, prelude: str = "") -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FAKE_GRPCURL_TARGETS": (
            f"{README_ENCODER}={demo.stack.encoder_target},{README_SEARCH}={demo.stack.search_target}"
        ),
    }
    return subprocess.run(
        ["bash", "-c", f"set -e\n{prelude}\n{command}"],
        cwd=demo.work, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_grpcurl_call_in_the_readme_answers(demo: Demo) -> None:
    commands = readme_commands("grpcurl ")
    assert len(commands) >= 8, commands
    fake = f'grpcurl() {{ "{sys.executable}" "{ROOT / "tests" / "fake_grpcurl.py"}" "$@"; }}'
    answers = {}
    for command in commands:
        done = run_in_bash(demo, command, prelude=fake)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        answers[command] = done.stdout

    def answer(*words: str) -> str:
        [text] = [out for command, out in answers.items() if all(w in command for w in words)]
        return text

    methods = answer("list vpm.v1.Search").split()
    assert {"vpm.v1.Search.Search", "vpm.v1.Search.UpsertProductBatches"} <= set(methods)
    similar = json.loads(answer('"product_id": "10001"'))["matches"]
    assert len(similar) == 5 and "10001" not in [m["product"]["id"] for m in similar]
    women = json.loads(answer('"gender": "Women"'))["matches"]
    assert women and {m["product"]["gender"] for m in women} == {"Women"}
    by_photo = json.loads(answer("Search/Search", "base64"))["matches"]
    assert by_photo[0]["product"]["id"] == "10001" and by_photo[0]["score"] > 0.99
    assert json.loads(answer("GetStats"))["products"] == str(DEMO_PRODUCTS)  # int64: a string
    model = json.loads(answer("GetModelInfo"))["modelId"]
    assert json.loads(answer("Health/Check"))["status"] == "SERVING"
    batch = json.loads(answer("EncodeImageBatches"))
    assert batch["id"] == "b1" and batch["vectors"]["rows"] == 1 and batch["modelId"] == model


def test_the_readme_demo_queries_answer(demo: Demo) -> None:
    commands = readme_commands(".venv/bin/python -m demo.query")
    assert len(commands) >= 3, commands
    for command in commands:
        done = run_in_bash(demo, f"{command} --search {demo.stack.search_target}")
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        assert re.search(r"\b100\d\d\b", done.stdout), f"{command}\n{done.stdout}"


def test_the_readme_json_api_calls_answer(demo: Demo) -> None:
    commands = readme_commands("curl ")
    assert len(commands) >= 7, commands
    web = demo.stack.web_url.removeprefix("http://")
    replies = {}
    for command in commands:
        done = run_in_bash(demo, command.replace(README_WEB, web) + " --fail --silent")
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        replies[command] = done.stdout

    def reply(*words: str) -> dict:
        [text] = [out for command, out in replies.items() if all(w in command for w in words)]
        return json.loads(text)

    page = reply("id=10001", "offset=5")
    assert page["offset"] == 5 and {m["gender"] for m in page["matches"]} <= {"Women"}
    assert all(m["score"] >= 0.2 for m in reply("min_score=0.2")["matches"])
    assert reply("-F image=@")["matches"][0]["id"] == "10001"
    facets = reply("api/facets")
    with (demo.work / "data" / "demo-catalog" / "styles.csv").open() as file:
        apparel = [row for row in csv.DictReader(file) if row["masterCategory"] == "Apparel"]
    genders = Counter(row["gender"] for row in apparel)
    assert facets["products"] == len(apparel) > 0
    by_field = {facet["field"]: facet["values"] for facet in facets["facets"]}
    assert set(by_field) == {"base_colour", "gender"}
    assert {v["value"]: v["count"] for v in by_field["gender"]} == genders
    assert reply("api/products/10001")["id"] == "10001"
    assert reply("api/status")["random_weights"] is True
    with Image.open(demo.work / "thumb.jpg") as thumbnail:
        assert thumbnail.format == "JPEG"
