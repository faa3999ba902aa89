"""The gallery in a real browser: headless Chromium driven by Selenium against a real
`python imgapi.py`. Uploads through the file input (photos and a file the server refuses), the
cards' thumbnails and job states kept current by the event stream, the detail view (EXIF, GPS,
keyboard, back button, deep links), retry, delete, the failed filter, the phone layout, dark
mode, names that are markup shown as text, no console errors; keys mode: the key prompt, a
refused key, signed image URLs, a revoked key; infinite scroll through the Link header; the
event-stream parser; reconnecting after a server restart.

Needs the system's chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`)
and selenium (the `test` extra). Without them the tests skip, or fail when
IMGAPI_BROWSER_REQUIRED=1 (CI). Screenshots go to the test's tmp_path; with
IMGAPI_SCREENSHOT_TO=docs/gallery.png the desktop one is also written there (a PNG under 300 KB).
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import corpus_folder
from PIL import Image
from procs import REPO, Proc, db_rows, run_command, settings_for, start_api

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the test extra is not installed: the fixture says so
    webdriver = None  # type: ignore[assignment]

pytestmark = [pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20
DOCS_PNG_LIMIT = 300_000
# Photos with a camera model and a GPS position (../shared/corpus/photos/MANIFEST.tsv), by their
# EXIF Model: a small camera JPEG, a phone photo with a lens model, a phone photo stored sideways
# (orientation 6).
PHOTOS = {
    "nikon-p6000-gps.jpg": "COOLPIX P6000",
    "iphone6plus-8mp-gps.jpg": "iPhone 6 Plus",
    "samsung-s7-12mp-gps-orient6.jpg": "SM-G930V",
}
NOT_AN_IMAGE = "budget-2026.xlsx"
HOSTILE_NAME = "<img src=x onerror=window.__pwned=1>.jpg"

# Every card's state in one round trip: polling this is cheaper and steadier than one WebDriver
# call per element.
CARDS_JS = """
return [...document.querySelectorAll('#grid .card')].map((card) => {
  const img = card.querySelector('img');
  return {
    id: card.dataset.imageId,
    status: card.dataset.status,
    name: card.querySelector('.card-name').textContent,
    caption: card.querySelector('.card-caption').textContent,
    error: card.querySelector('.card-error').textContent,
    alt: img.getAttribute('alt'),
    src: img.currentSrc || img.src,
    srcset: img.getAttribute('srcset'),
    loading: img.getAttribute('loading'),
    natural: img.complete ? img.naturalWidth : 0,
    left: card.getBoundingClientRect().left,
    width: card.getBoundingClientRect().width,
    jobs: Object.fromEntries(
      [...card.querySelectorAll('.job')].map((j) => [j.dataset.kind, j.dataset.state])),
  };
});
"""


# -- the browser ---------------------------------------------------------------------------------


def browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if webdriver is None:
        missing.append("the selenium package")
    if missing:
        message = f"optional: the browser tests need {', '.join(missing)}"
        if os.environ.get("IMGAPI_BROWSER_REQUIRED") == "1":
            pytest.fail(message + " and IMGAPI_BROWSER_REQUIRED=1")
        pytest.skip(message)


class Browser:
    """A WebDriver with the console log kept across reads (each read of the log drains it)."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver
        self.log: list[dict[str, Any]] = []

    def wait(self, condition: Callable[[WebDriver], Any], what: str, within: float = WAIT_S) -> Any:
        try:
            return WebDriverWait(self.driver, within, poll_frequency=0.1).until(condition)
        except TimeoutException:
            self.collect_log()
            cards = [(c["name"], c["status"], c["natural"], c["jobs"]) for c in self.cards()]
            pytest.fail(f"{what}: not within {within}s; cards: {cards}; console: {self.log}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def attributes(self, selector: str, name: str) -> list[str | None]:
        """An attribute of every match, read in one step: a live update may replace elements
        between a find and a read (a stale element)."""
        return self.js(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map((el) => el.getAttribute(arguments[1]))",
            selector,
            name,
        )

    def cards(self) -> list[dict[str, Any]]:
        return self.js(CARDS_JS)

    def viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1) -> None:
        # The page's own size, exactly: a window size would include the browser's frame.
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    def dialog_open(self, dialog_id: str) -> bool:
        return bool(self.js("return document.getElementById(arguments[0]).open", dialog_id))

    def collect_log(self) -> list[dict[str, Any]]:
        self.log += self.driver.get_log("browser")
        return self.log

    def severe(self, allowed: list[re.Pattern[str]]) -> list[dict[str, Any]]:
        """SEVERE console entries but the expected refusals of the network (a 415, a 401)."""
        return [
            entry
            for entry in self.collect_log()
            if entry["level"] == "SEVERE"
            and not (
                entry.get("source") == "network"
                and any(p.search(entry["message"]) for p in allowed)
            )
        ]


@pytest.fixture
def browser() -> Iterator[Browser]:
    browser_or_skip()
    options = webdriver.ChromeOptions()
    # The system's chromium and its matching chromedriver, named explicitly: Selenium Manager
    # would otherwise try to download a browser and a driver.
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1280,800",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield Browser(driver)
    finally:
        driver.quit()


def network_refusal(api: Proc, path: str, status: int) -> re.Pattern[str]:
    """The console line Chromium writes for an answer with an error status."""
    return re.compile(
        rf"^{re.escape(api.url + path)}(\?\S*)? - Failed to load resource: the server responded"
        rf" with a status of {status}\b"
    )


def save_screenshot(browser: Browser, path: Path) -> None:
    assert browser.driver.save_screenshot(str(path)), path


def docs_png(source: Path, target: Path) -> None:
    """The screenshot as a palette PNG (photos in a 24-bit PNG are several hundred KB)."""
    image = Image.open(source).convert("RGB")
    for colors in (256, 192, 128, 64):
        buffer = io.BytesIO()
        image.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, "PNG", optimize=True
        )
        if buffer.tell() <= DOCS_PNG_LIMIT:
            break
    assert buffer.tell() <= DOCS_PNG_LIMIT, buffer.tell()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 200), (40, 120, 200)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


# -- open mode -----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Proc]:
    # A loopback address: AUTH=auto is open, as on a developer's machine.
    proc = start_api(settings_for(tmp_path / "api"), tmp_path / "api.log")
    try:
        yield proc
    finally:
        proc.stop()


def test_gallery_upload_live_states_detail_and_delete(
    browser: Browser, api: Proc, tmp_path: Path
) -> None:
    folder = corpus_folder("photos")
    bad = tmp_path / NOT_AN_IMAGE
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # a zip header, as an .xlsx starts
    d = browser.driver
    browser.viewport(1280, 800)
    d.get(api.url + "/")
    browser.wait(
        lambda _: browser.js("return document.getElementById('live').dataset.state") == "live",
        "event stream",
    )
    assert d.title == "imgapi gallery"
    # Set once: still there at the end means nothing below reloaded the page.
    browser.js("window.__sameDocument = true")

    # -- upload: three photos and a file the server refuses, all in one pick ------------------
    files = [folder / name for name in PHOTOS] + [bad]
    d.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in files))

    row = f'#uploads .upload-row[data-file-name="{NOT_AN_IMAGE}"]'
    failed_row = browser.wait(
        lambda _: (d.find_elements(By.CSS_SELECTOR, f'{row}[data-state="failed"]') or [None])[0],
        "the refused file's row",
    )
    assert 'file type ".xlsx" is not allowed' in failed_row.text

    def photos_finished(_: WebDriver) -> list[dict[str, Any]] | None:
        cards = [c for c in browser.cards() if c["name"] in PHOTOS]
        done = [
            c
            for c in cards
            if c["status"] == "success"
            and c["natural"] > 0
            and c["jobs"].get("thumbnail") == "done"
            and c["jobs"].get("exif") == "done"
            and c["jobs"].get("caption") in ("done", "skipped")  # CAPTION_MODEL=none: skipped
        ]
        return done if len(done) == len(PHOTOS) else None

    finished = browser.wait(photos_finished, "thumbnails and finished jobs on every photo's card")
    ids = {c["name"]: c["id"] for c in finished}
    for card in finished:
        assert card["alt"] == card["name"]  # no caption (captions off): the file name
        assert card["loading"] == "lazy"
        small, medium = (f"/api/images/{card['id']}/thumbnails/{s}" for s in ("small", "medium"))
        assert re.fullmatch(rf"\S*{small} 256w, \S*{medium} 768w", card["srcset"]), card
        assert "/thumbnails/" in card["src"]
    cards = browser.cards()
    refused = [c for c in cards if c["name"] == NOT_AN_IMAGE]
    assert len(refused) == 1 and refused[0]["status"] == "failed"
    assert 'file type ".xlsx" is not allowed' in refused[0]["error"]
    # Newest first, as the API lists them.
    listed = [r["data"]["image_id"] for r in httpx.get(api.url + "/api/images").json()]
    assert [c["id"] for c in cards] == listed

    browser.wait(
        lambda _: (
            d.find_element(By.CSS_SELECTOR, '[data-stat="total"]').text == "4"
            and d.find_element(By.CSS_SELECTOR, '[data-stat="failed"]').text == "1"
            and d.find_element(By.CSS_SELECTOR, '[data-stat="success_rate"]').text == "75.00%"
        ),
        "the header's figures",
    )
    # Finished uploads leave the list by themselves; the refused one stays, with its reason.
    browser.wait(
        lambda _: browser.attributes("#uploads .upload-row", "data-file-name") == [NOT_AN_IMAGE],
        "the list of uploads holding only the refused file",
    )
    desktop = tmp_path / "gallery-desktop.png"
    save_screenshot(browser, desktop)
    if target := os.environ.get("IMGAPI_SCREENSHOT_TO"):
        docs_png(desktop, REPO / target if not Path(target).is_absolute() else Path(target))

    # -- an upload from elsewhere shows up by itself (the event stream); its name, markup that
    # would run if it were ever inserted as HTML, shows as the text it is -----------------------
    res = httpx.post(
        api.url + "/api/images", files={"file": (HOSTILE_NAME, small_jpeg(), "image/jpeg")}
    )
    assert res.status_code == 201, res.text
    other = res.json()["data"]["image_id"]
    stored_name = res.json()["data"]["original_name"]
    assert "<img" in stored_name
    browser.wait(
        lambda _: any(
            c["id"] == other and c["jobs"].get("thumbnail") == "done" and c["natural"] > 0
            for c in browser.cards()
        ),
        "a card for the upload made elsewhere",
    )
    newest = browser.cards()[0]
    assert newest["id"] == other
    assert newest["name"] == stored_name and newest["alt"] == stored_name
    assert browser.js("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert browser.js("return window.__pwned") is None

    # -- the failed filter ---------------------------------------------------------------------
    d.find_element(By.ID, "failed-only").click()
    browser.wait(
        lambda _: [c["name"] for c in browser.cards()] == [NOT_AN_IMAGE], "only the failed upload"
    )
    assert d.current_url.endswith("/?status=failed")
    d.find_element(By.ID, "failed-only").click()
    browser.wait(lambda _: len(browser.cards()) == 5, "every upload again")

    # -- the detail view, by keyboard -------------------------------------------------------------
    nikon = ids["nikon-p6000-gps.jpg"]
    card = d.find_element(By.CSS_SELECTOR, f'.card[data-image-id="{nikon}"]')
    card.send_keys(Keys.ENTER)
    browser.wait(lambda _: browser.dialog_open("detail"), "the detail view")
    assert d.current_url.endswith(f"/#/images/{nikon}")
    detail = d.find_element(By.ID, "detail")
    browser.wait(
        lambda _: detail.find_elements(By.CSS_SELECTOR, 'tr[data-tag="Model"]'), "the EXIF table"
    )
    assert cell(browser, 'tr[data-tag="Make"] td') == "NIKON"
    assert cell(browser, 'tr[data-tag="Model"] td') == PHOTOS["nikon-p6000-gps.jpg"]
    assert cell(browser, 'tr[data-tag="Model"] th') == "Camera model"
    assert cell(browser, 'tr[data-tag="ExposureTime"] td') == "1/75 s"
    assert cell(browser, 'tr[data-tag="FNumber"] td') == "f/5.9"
    tags = browser.attributes("#detail .exif-table tr[data-tag]", "data-tag")
    first = ["Make", "Model", "ExposureTime", "FNumber", "ISOSpeedRatings", "FocalLength"]
    assert tags[: len(first)] == first, tags
    assert tags.index("DateTimeOriginal") < tags.index("ColorSpace")
    assert "GPSLatitude" in tags and "Software" in tags
    (osm,) = browser.attributes("#detail a.osm-link", "href")
    assert osm.startswith("https://www.openstreetmap.org/")
    assert "mlat=43.46" in osm and "mlon=11.88" in osm  # metadata.exif.latitude/longitude
    assert cell(browser, '[data-fact="dimensions"]') == "640 × 480 px"
    (original,) = browser.attributes("#detail .links a[download]", "href")
    assert original.endswith(f"/api/images/{nikon}/original")
    states = dict(
        zip(
            browser.attributes("#detail .jobs-table tbody tr", "data-kind"),
            browser.attributes("#detail .jobs-table tbody tr", "data-state"),
            strict=True,
        )
    )
    assert states == {"thumbnail": "done", "exif": "done", "caption": "skipped"}
    # Skipped (captions off): it can be queued again, and the job goes round once more.
    detail.find_element(By.CSS_SELECTOR, 'button.retry[data-kind="caption"]').click()
    db = tmp_path / "api" / "data" / "imgapi.db"
    browser.wait(
        lambda _: db_rows(
            db,
            "SELECT 1 FROM events WHERE type = 'job.queued' AND kind = 'caption' AND image_id = ?",
            (nikon,),
        ),
        "the caption job queued again",
    )
    browser.wait(
        lambda _: (
            cell(browser, 'tr[data-kind="caption"] td.state') == "skipped"
            and cell(browser, 'button.retry[data-kind="caption"]') == "Retry"
        ),
        "the caption job skipped again, in the detail view",
    )
    browser.wait(
        lambda _: (
            browser.js("return document.querySelector('#detail .preview img').naturalWidth") > 0
        ),
        "the medium thumbnail",
    )
    save_screenshot(browser, tmp_path / "detail-desktop.png")

    # Escape closes it, back to the grid's URL, focus back on the card.
    d.switch_to.active_element.send_keys(Keys.ESCAPE)
    browser.wait(lambda _: not browser.dialog_open("detail"), "Escape closing the detail view")
    assert "#/images/" not in d.current_url
    assert d.switch_to.active_element.get_attribute("data-image-id") == nikon

    # The back button closes it too; a link opens it directly.
    d.find_element(By.CSS_SELECTOR, f'.card[data-image-id="{nikon}"]').click()
    browser.wait(lambda _: browser.dialog_open("detail"), "the detail view (click)")
    d.back()
    browser.wait(lambda _: not browser.dialog_open("detail"), "the back button closing it")
    assert browser.js("return window.__sameDocument") is True
    # A fresh load of the link (from another page: the same URL with only a new hash would
    # stay in this document).
    d.get("about:blank")
    d.get(f"{api.url}/#/images/{ids['iphone6plus-8mp-gps.jpg']}")
    browser.wait(lambda _: browser.dialog_open("detail"), "the detail view from its link")
    detail = d.find_element(By.ID, "detail")
    browser.wait(
        lambda _: cell(browser, 'tr[data-tag="LensModel"] td').startswith(
            "iPhone 6 Plus back camera"
        ),
        "the lens model",
    )
    assert cell(browser, 'tr[data-tag="Model"] td') == PHOTOS["iphone6plus-8mp-gps.jpg"]

    # -- delete, with a confirmation --------------------------------------------------------------
    gone = ids["iphone6plus-8mp-gps.jpg"]
    detail.find_element(By.CSS_SELECTOR, "button.delete").click()
    confirm = browser.wait(
        lambda _: (detail.find_elements(By.CSS_SELECTOR, "button.confirm-delete") or [None])[0],
        "the delete confirmation",
    )
    assert httpx.get(f"{api.url}/api/images/{gone}").status_code == 200  # not before the confirm
    confirm.click()
    browser.wait(lambda _: not browser.dialog_open("detail"), "the detail view closing")
    browser.wait(lambda _: gone not in [c["id"] for c in browser.cards()], "the deleted card going")
    assert httpx.get(f"{api.url}/api/images/{gone}").status_code == 404
    assert "#/images/" not in d.current_url

    # -- a phone: one column ----------------------------------------------------------------------
    browser.viewport(390, 844, mobile=True, scale=2)
    browser.wait(lambda _: len({round(c["left"]) for c in browser.cards()}) == 1, "one column")
    assert all(c["width"] > 300 for c in browser.cards())
    save_screenshot(browser, tmp_path / "gallery-phone.png")

    # -- dark mode, from the system's setting ---------------------------------------------------
    background = "return getComputedStyle(document.body).backgroundColor"
    assert browser.js(background) == "rgb(245, 246, 248)"
    d.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    browser.wait(lambda _: browser.js(background) == "rgb(18, 20, 24)", "the dark colours")
    save_screenshot(browser, tmp_path / "gallery-phone-dark.png")
    for shot in ("gallery-desktop.png", "detail-desktop.png", "gallery-phone.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot

    allowed = [network_refusal(api, "/api/images", 415)]
    assert browser.severe(allowed) == []


def cell(browser: Browser, selector: str) -> str:
    """The text of the detail view's element, read in one step (a live update may replace it
    between a find and a read)."""
    return browser.js(
        "const el = document.querySelector('#detail ' + arguments[0]);"
        " return el ? el.textContent.trim() : '';",
        selector,
    )


# -- keys mode -----------------------------------------------------------------------------------


def test_keys_mode_asks_for_a_key_refuses_a_wrong_one_and_uses_signed_urls(
    browser: Browser, tmp_path: Path
) -> None:
    folder = corpus_folder("photos")
    env = settings_for(tmp_path / "api", AUTH="keys")
    made = run_command(
        [sys.executable, "imgapi.py", "keys", "create", "gallery", "--scopes", "read,upload"],
        env,
        REPO,
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[-1].strip()
    api = start_api(env, tmp_path / "api.log")
    try:
        d = browser.driver
        browser.viewport(1280, 800)
        d.get(api.url + "/")
        browser.wait(lambda _: browser.dialog_open("key-dialog"), "the key prompt")
        assert d.find_elements(By.CSS_SELECTOR, "#grid .card") == []

        key_input = d.find_element(By.ID, "key-input")
        key_input.send_keys("imgapi_000000000000_" + "x" * 43, Keys.ENTER)
        browser.wait(
            lambda _: "not valid" in d.find_element(By.ID, "key-error").text,
            "the server's refusal in the prompt",
        )
        assert browser.dialog_open("key-dialog")
        save_screenshot(browser, tmp_path / "key-refused.png")
        assert browser.js("return sessionStorage.getItem('imgapi.key')") is None

        key_input.clear()
        key_input.send_keys(token, Keys.ENTER)
        browser.wait(lambda _: not browser.dialog_open("key-dialog"), "the prompt closing")
        browser.wait(
            lambda _: browser.js("return document.getElementById('live').dataset.state") == "live",
            "the event stream with the key",
        )
        assert browser.js("return sessionStorage.getItem('imgapi.key')") == token
        browser.wait(
            lambda _: "No images yet" in d.find_element(By.ID, "grid-status").text, "the grid"
        )

        d.find_element(By.ID, "file-input").send_keys(str(folder / "nikon-p6000-gps.jpg"))
        card = browser.wait(
            lambda _: next(
                (
                    c
                    for c in browser.cards()
                    if c["natural"] > 0 and c["jobs"].get("exif") == "done"
                ),
                None,
            ),
            "the uploaded photo's card",
        )
        # An <img> cannot send the key: the record's signed URL is what loads.
        assert re.search(r"[?&]exp=\d+&sig=", card["src"]), card["src"]
        assert httpx.get(api.url + f"/api/images/{card['id']}").status_code == 401

        # The key revoked while the page is open: the next call's 401 brings the prompt back.
        revoked = run_command([sys.executable, "imgapi.py", "keys", "revoke", "gallery"], env, REPO)
        assert revoked.returncode == 0, revoked.stderr

        def prompt_back(_: WebDriver) -> bool:
            if browser.dialog_open("key-dialog"):
                return True
            browser.js("document.getElementById('failed-only').click()")  # a request of the page
            return False

        browser.wait(prompt_back, "the prompt after the key was revoked")
        assert "not valid" in d.find_element(By.ID, "key-error").text
        assert browser.js("return sessionStorage.getItem('imgapi.key')") is None

        allowed = [
            network_refusal(api, path, 401) for path in ("/api/stats", "/api/images", "/api/events")
        ]
        assert browser.severe(allowed) == []
    finally:
        api.stop()


# -- more than a page; the stream's parser; a server restart -------------------------------------


def test_infinite_scroll_follows_the_link_header(browser: Browser, api: Proc) -> None:
    page = 48  # the page's PAGE_SIZE (web/js/grid.js)
    total = page + 12
    data = small_jpeg()
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for n in range(total):
            res = http.post(
                "/api/images", files={"file": (f"scroll-{n:02d}.jpg", data, "image/jpeg")}
            )
            assert res.status_code == 201, res.text
        listed = [r["data"]["image_id"] for r in http.get("/api/images?limit=1000").json()]
    assert len(listed) == total
    d = browser.driver
    browser.viewport(1280, 800)
    d.get(api.url + "/")
    browser.wait(lambda _: len(browser.cards()) == page, "the first page")
    # The second page is only asked for once the end of the grid comes near.
    assert len(browser.cards()) == page
    browser.js("window.scrollTo(0, document.body.scrollHeight)")
    browser.wait(lambda _: len(browser.cards()) == total, "the second page")
    assert [c["id"] for c in browser.cards()] == listed
    browser.wait(
        lambda _: d.find_element(By.ID, "grid-status").text == "That is all.", "the end of the list"
    )
    assert browser.severe([]) == []


# Chunks cut at awkward places: inside a field name, between the \r and \n of one line break,
# inside a multi-byte character (the page decodes with TextDecoderStream; here text is fed).
SSE_CASES_JS = """
const done = arguments[arguments.length - 1];
import('/web/js/events.js').then(({ SseParser }) => {
  const seen = [];
  const parser = new SseParser((event) => seen.push(event));
  const chunks = [
    'retry: 2000\\n\\n',
    ': keep-alive\\n\\n',
    'id: 41\\nevent: image.uploaded\\nda', 'ta: {"id":41}\\n\\n',
    'id: 42\\r', '\\nevent: job.done\\r\\ndata: {"id":42}\\r\\n\\r\\n',
    'id: 43\\rdata: line one\\rdata: line two\\r\\r',
    'id: 44\\n\\n',
    'data:no space\\n\\n',
    'event: x\\ndata: {"a":"\u00e9t\u00e9"}\\n',
    '\\n',
  ];
  for (const chunk of chunks) parser.push(chunk);
  done({ seen, lastId: parser.lastId, retry: parser.retry });
}).catch((error) => done({ error: String(error) }));
"""


def test_the_event_stream_parser(browser: Browser, api: Proc) -> None:
    browser.driver.get(api.url + "/")
    result = browser.driver.execute_async_script(SSE_CASES_JS)
    assert "error" not in result, result
    assert result["retry"] == 2000
    assert result["seen"] == [
        {"type": "image.uploaded", "data": '{"id":41}', "id": "41"},
        {"type": "job.done", "data": '{"id":42}', "id": "42"},
        {"type": "message", "data": "line one\nline two", "id": "43"},
        {"type": "message", "data": "no space", "id": "44"},  # an id alone dispatches nothing
        {"type": "x", "data": '{"a":"été"}', "id": "44"},
    ]
    assert result["lastId"] == "44"


def test_the_page_reconnects_after_a_server_restart(browser: Browser, tmp_path: Path) -> None:
    env = settings_for(tmp_path / "api")
    api = start_api(env, tmp_path / "api.log")
    port = int(api.url.rsplit(":", 1)[1])
    live_state = "return document.getElementById('live').dataset.state"
    try:
        d = browser.driver
        d.get(api.url + "/")
        browser.wait(lambda _: browser.js(live_state) == "live", "the event stream")
        first = httpx.post(
            api.url + "/api/images", files={"file": ("before.jpg", small_jpeg(), "image/jpeg")}
        ).json()["data"]["image_id"]
        browser.wait(lambda _: first in [c["id"] for c in browser.cards()], "the first upload")

        assert api.stop() == 0
        browser.wait(lambda _: browser.js(live_state) == "reconnecting", "the stream's loss seen")
        api = start_api(env, tmp_path / "api-2.log", port=port)
        # Made before the page is back, most likely: it comes from the events after the
        # Last-Event-ID the page resumes from.
        second = httpx.post(
            api.url + "/api/images", files={"file": ("after.jpg", small_jpeg(), "image/jpeg")}
        ).json()["data"]["image_id"]
        browser.wait(lambda _: browser.js(live_state) == "live", "the stream back", within=25)
        browser.wait(
            lambda _: [c["id"] for c in browser.cards()][:2] == [second, first],
            "the upload made across the restart",
        )
        # While the server was away the page's calls (reconnects, the header's figures) were
        # refused: the network's words for that are expected; nothing else. The page says
        # nothing of it once the stream is back.
        base = re.escape(api.url)
        allowed = [re.compile(rf"^{base}/\S* - Failed to load resource: net::ERR_")]
        assert browser.severe(allowed) == []
        browser.wait(lambda _: not d.find_element(By.ID, "notice").is_displayed(), "no notice")
    finally:
        api.stop()
