"""The page in a real browser (Debian's Chromium, driven by Selenium) against real processes:
encoder (tiny model), search service, indexer over a demo catalog, and `python -m web`.

Screenshots of every state are saved under data/test-artifacts/web/ (or
$VPM_TEST_ARTIFACTS/web/); the run prints the folder. Under CI=true a missing
browser fails the run instead of skipping these tests.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from demo.catalog import generate
from tests.support import ROOT, ServiceProcess, demo_stack
from web.errors import SEARCH_DOWN

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("VPM_TEST_ARTIFACTS", ROOT / "data" / "test-artifacts")) / "web"
PRODUCTS = 36
WAIT_S = 60


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "Chromium and its driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: under CI the browser tests must run", pytrace=False)
    pytest.skip(why)


@dataclass
class Stack:
    catalog: Path
    search: ServiceProcess
    url: str
    styles: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("page")
    catalog = generate(work / "catalog", count=PRODUCTS)
    with demo_stack(work, catalog, model_cache) as demo:
        with (catalog / "styles.csv").open() as file:
            styles = {row["id"]: row for row in csv.DictReader(file)}
        yield Stack(catalog, demo.search, demo.web_url, styles)


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[object]:
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"browser screenshots: {ARTIFACTS}")
    yield driver
    driver.quit()


def shot(driver: object, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(driver: object, condition, timeout_s: float = WAIT_S) -> object:  # noqa: ANN001
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: condition(d))


def results(driver: object) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        card.find_element(By.CSS_SELECTOR, ".more").get_attribute("data-id")
        for card in driver.find_elements(By.CSS_SELECTOR, "#results .card")
    ]


def searched(driver: object, before: str) -> str:
    """Wait until the summary line changes from `before` and is no longer 'Searching…'."""
    from selenium.webdriver.common.by import By

    def done(d: object) -> str | None:
        text = d.find_element(By.ID, "summary").text
        message = d.find_element(By.ID, "message")
        if message.is_displayed():
            return "message"
        return text if text and text != before and not text.startswith("Searching") else None

    return wait_for(driver, done)


def summary(driver: object) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "summary").text


def test_a_photo_finds_its_product_first_and_more_like_this_follows(
    stack: Stack, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(stack.url)
    wait_for(browser, lambda d: "products" in d.find_element(By.ID, "catalog").text)
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed() and "RANDOM weights" in banner.text
    # A shopper's photo of product 10007: the catalog picture, re-encoded smaller.
    with Image.open(stack.catalog / "images" / "10007.jpg") as original:
        buffer = io.BytesIO()
        original.resize((270, 360)).save(buffer, "JPEG", quality=80)
    photo = tmp_path / "my-photo.jpg"
    photo.write_bytes(buffer.getvalue())
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    searched(browser, "")
    found = results(browser)
    assert found[0] == "10007", (found, browser.find_element(By.ID, "message").text)
    first = browser.find_element(By.CSS_SELECTOR, "#results .card img")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", first) > 0)
    shot(browser, "01-photo-search")

    chosen = found[1]
    before = summary(browser)
    browser.find_element(By.CSS_SELECTOR, f'#results .more[data-id="{chosen}"]').click()
    assert f"product {chosen}" in searched(browser, before)
    neighbours = results(browser)
    assert neighbours and chosen not in neighbours
    shot(browser, "02-more-like-this")

    gender = browser.find_element(By.ID, "filter-gender")
    value = gender.find_elements(By.TAG_NAME, "option")[1].get_attribute("value")
    before = summary(browser)
    gender.send_keys(value)  # by keyboard, as a user without a mouse would
    searched(browser, before)
    filtered = results(browser)
    assert filtered and all(stack.styles[i]["gender"] == value for i in filtered), filtered
    shot(browser, "03-filtered")

    browser.set_window_size(390, 844)
    shot(browser, "04-phone-width")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, "nothing wider than a phone's screen"
    browser.set_window_size(1280, 1400)


def test_a_text_file_gets_a_message(stack: Stack, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(stack.url)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n")
    browser.find_element(By.ID, "photo").send_keys(str(notes))
    message = wait_for(browser, lambda d: d.find_element(By.ID, "message").is_displayed())
    assert message
    text = browser.find_element(By.ID, "message").text
    assert "not an image the page can read" in text
    shot(browser, "05-not-an-image")


def test_the_address_holds_a_search_to_share_and_to_go_back_to(
    stack: Stack, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    gender = next(iter(stack.styles.values()))["gender"]
    shared = f"{stack.url}/?text=black+dress&filter.gender={gender}&top_k=12"
    browser.get(shared)  # as a link someone sent: the search runs on opening
    assert "black dress" in searched(browser, "")
    first = results(browser)
    assert 0 < len(first) <= 12 and all(stack.styles[i]["gender"] == gender for i in first)
    assert browser.find_element(By.ID, "text").get_attribute("value") == "black dress"
    assert browser.find_element(By.ID, "filter-gender").get_attribute("value") == gender
    assert browser.find_element(By.ID, "top-k").get_attribute("value") == "12"
    shot(browser, "06-opened-from-an-address")

    chosen = first[0]
    before = summary(browser)
    browser.find_element(By.CSS_SELECTOR, f'#results .more[data-id="{chosen}"]').click()
    assert f"product {chosen}" in searched(browser, before)
    address = browser.execute_script("return location.search")
    assert f"id={chosen}" in address and f"filter.gender={gender}" in address, address
    assert "text=" not in address
    neighbours = results(browser)
    assert chosen not in neighbours and all(stack.styles[i]["gender"] == gender for i in neighbours)

    before = summary(browser)
    browser.back()  # the text search again, as it was
    assert "black dress" in searched(browser, before)
    assert results(browser) == first
    assert browser.find_element(By.ID, "text").get_attribute("value") == "black dress"

    photo = tmp_path / "photo.jpg"
    photo.write_bytes((stack.catalog / "images" / chosen).with_suffix(".jpg").read_bytes())
    before = summary(browser)
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    assert "your photo" in searched(browser, before)
    assert results(browser)[0] == chosen
    assert browser.execute_script("return location.search") == ""  # a photo has no address
    before = summary(browser)
    browser.back()
    assert "black dress" in searched(browser, before)
    before = summary(browser)
    browser.forward()  # the photo's entry: the same photo searched again
    assert "your photo" in searched(browser, before)
    assert results(browser)[0] == chosen


def test_the_search_service_down_gets_a_message_and_the_page_still_loads(
    stack: Stack, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    stack.search.stop()
    browser.get(stack.url)
    wait_for(browser, lambda d: d.find_element(By.ID, "message").is_displayed())
    assert browser.find_element(By.ID, "message").text == SEARCH_DOWN
    box = browser.find_element(By.ID, "text")
    box.send_keys("red t-shirt\n")
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == SEARCH_DOWN)
    assert results(browser) == []
    shot(browser, "07-search-down")
