"""The gallery's files: the page at / (HTML, its Content-Security-Policy, revalidated on every
load), every file under web/ at /web/... with its content type, ETag and 304, nothing outside web/
or hidden in it, /docs unchanged, and all of it without a key in keys mode. Through sanic-testing's
ASGI client; paths that an HTTP client would normalise (`..`) are sent as raw ASGI requests. The
page itself, in a real browser: system/test_gallery_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from conftest import REPO, running_app
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.access.scopes import PUBLIC, access_of
from imgapi_core.routes import web

WEB = REPO / "web"
# Written out here rather than read from the module: the test says what a browser must get.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
CSP_DIRECTIVES = {
    "default-src": "'self'",
    "img-src": "'self' data: blob:",
    "connect-src": "'self'",
    "style-src": "'self'",
    "script-src": "'self'",
    "frame-ancestors": "'none'",
}


def web_files() -> list[Path]:
    return sorted(
        p
        for p in WEB.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(WEB).parts)
    )


def url_of(path: Path) -> str:
    return "/web/" + path.relative_to(WEB).as_posix()


def csp(header: str) -> dict[str, str]:
    directives = (d.strip().split(None, 1) for d in header.split(";") if d.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def assert_not_found(res: Any, what: str) -> None:
    assert res.status == 404, (what, res.status)
    body = res.json
    assert body["status"] == "failed" and body["data"] is None and body["error"], (what, body)


async def raw_get(app: Sanic, raw_path: bytes) -> tuple[int, bytes]:
    """GET with the path exactly as given: httpx (and so the test client) resolves `..` and
    `.` segments itself before anything is sent, as browsers do, but other clients need not.
    The app must have served one request of the test client first (its routers are finalised
    then)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# -- the page -------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """What of the page a strict CSP would refuse, and what files it refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.refs: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name in names:
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            if not names.get("src"):
                self.inline.append("<script> without src")
            self._in_script = True
        for name in ("src", "href"):
            value = names.get(name)
            if value and value.startswith("/"):
                self.refs.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline script text")


async def test_the_gallery_page_is_served_at_the_root(client: SanicASGITestClient) -> None:
    _, res = await client.get("/")
    assert res.status == 200, res.text
    assert res.headers["content-type"] == "text/html; charset=utf-8"
    assert res.headers["cache-control"] == "no-cache"
    assert res.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{32}"', res.headers["etag"])
    assert res.content == (WEB / "index.html").read_bytes()
    policy = csp(res.headers["content-security-policy"])
    for directive, value in CSP_DIRECTIVES.items():
        assert policy.get(directive) == value, (directive, policy)
    # The page must work under that policy: no inline script, style or handler.
    page = PageParser()
    page.feed(res.text)
    assert page.inline == []
    assert '<script type="module" src="/web/js/main.js">' in res.text

    # If-None-Match as browsers and caches send it: the tag, weak, in a list, or *.
    etag = res.headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        _, again = await client.get("/", headers={"If-None-Match": header})
        assert again.status == 304 and again.content == b"", header
        assert again.headers["etag"] == etag
        assert again.headers["cache-control"] == "no-cache"
    _, changed = await client.get("/", headers={"If-None-Match": '"an-older-page"'})
    assert changed.status == 200 and changed.content == res.content


async def test_every_file_under_web_is_served_with_its_type_and_validators(
    client: SanicASGITestClient,
) -> None:
    files = web_files()
    assert {p.suffix for p in files} <= TYPES.keys(), "a file type the test does not know"
    assert {"index.html", "app.css", "js/main.js"} <= {p.relative_to(WEB).as_posix() for p in files}
    for path in files:
        url = url_of(path)
        _, res = await client.get(url)
        assert res.status == 200, (url, res.status)
        assert res.headers["content-type"] == TYPES[path.suffix], url
        assert res.content == path.read_bytes(), url
        assert res.headers["cache-control"] == "no-cache", url
        assert res.headers["x-content-type-options"] == "nosniff", url
        etag = res.headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag), (url, etag)
        if path.suffix == ".html":
            assert "frame-ancestors 'none'" in res.headers["content-security-policy"], url

        _, cached = await client.get(url, headers={"If-None-Match": etag})
        assert cached.status == 304 and cached.content == b"", url
        assert cached.headers["etag"] == etag, url
        assert cached.headers["cache-control"] == "no-cache", url

        _, head = await client.head(url)
        assert head.status == 200 and head.content == b"", url
        assert head.headers["content-length"] == str(path.stat().st_size), url
        assert head.headers["etag"] == etag, url


async def test_every_file_the_page_refers_to_is_there(client: SanicASGITestClient) -> None:
    """The page's links and the modules' imports, so that no file of the gallery 404s."""
    page = PageParser()
    page.feed((WEB / "index.html").read_text())
    refs = set(page.refs)
    for module in (WEB / "js").glob("*.js"):
        for target in re.findall(
            r'(?m)^\s*(?:import|export)\b[^;]*?from\s+"([^"]+)"', module.read_text()
        ):
            assert target.startswith("./"), (module.name, target)  # relative, no bare specifiers
            refs.add(url_of((module.parent / target).resolve()))
        for target in re.findall(r'"(/web/[^"]+)"', module.read_text()):
            refs.add(target)
    assert "/web/js/main.js" in refs and "/web/js/api.js" in refs
    for ref in sorted(refs):
        _, res = await client.get(ref)
        assert res.status == 200, ref


async def test_the_web_routes_are_public_and_not_in_the_api_document(
    app: Sanic, client: SanicASGITestClient
) -> None:
    routes = [r for r in app.router.routes if r.name.split(".")[1:2] == ["web"]]
    assert {r.path for r in routes} == {"", "web/<relative:path>"}
    assert all(access_of(r.handler) == PUBLIC for r in routes)
    _, doc = await client.get("/docs/openapi.json")
    assert doc.status == 200
    assert not [p for p in doc.json["paths"] if p == "/" or p.startswith("/web")]


async def test_the_api_docs_are_still_served(client: SanicASGITestClient) -> None:
    _, res = await client.get("/docs")
    assert res.status == 200, res.status
    assert res.headers["content-type"].startswith("text/html")
    assert "swagger" in res.text.lower()
    # The page's strict policy is the page's own: the docs page loads its UI from a CDN.
    assert "content-security-policy" not in res.headers


# -- what is not served ----------------------------------------------------------------------------


TRAVERSALS = [
    b"/web/../imgapi.py",
    b"/web/../pyproject.toml",
    b"/web/js/../../imgapi.py",
    b"/web/%2e%2e/imgapi.py",
    b"/web/%2E%2E/%2E%2E/etc/passwd",
    b"/web/..%2fimgapi.py",
    b"/web/..%2Fimgapi.py",
    b"/web/%2e%2e%2fimgapi.py",
    b"/web/..%5cimgapi.py",
    b"/web/..\\imgapi.py",
    b"/web//etc/passwd",
    b"/web/%2fetc/passwd",
    b"/web/./index.html/../../imgapi.py",
    b"/web/index.html%00.js",
    b"/web/",
    b"/web/js",
    b"/web/js/",
    b"/web/missing.js",
]


async def test_paths_outside_web_are_not_found(app: Sanic, client: SanicASGITestClient) -> None:
    _, res = await client.get("/")
    assert res.status == 200
    for raw_path in TRAVERSALS:
        status, body = await raw_get(app, raw_path)
        assert status == 404, (raw_path, status, body[:200])
        assert b"import " not in body and b"[project]" not in body and b"root:" not in body
    # And as a normal client sends them (after resolving the dot segments itself).
    for path in ("/web/../imgapi.py", "/web/%2e%2e/imgapi.py", "/web/missing.css"):
        _, res = await client.get(path)
        assert_not_found(res, path)


async def test_hidden_files_unknown_types_and_links_out_are_not_served(
    client: SanicASGITestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "web"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "config").write_text("[core]")
    (root / ".env").write_text("URL_SECRET=x")
    (root / ".hidden.js").write_text("secret")
    (root / "js").mkdir()
    (root / "js" / "ok.js").write_text("export const ok = 1;\n")
    (root / "js" / "ok.js~").write_text("backup")
    (root / "notes.md").write_text("# notes")
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    outside = tmp_path / "secret.js"
    outside.write_text("outside")
    (root / "link.js").symlink_to(outside)
    (root / "inside.js").symlink_to(root / "js" / "ok.js")
    monkeypatch.setattr(web, "WEB_DIR", root)

    for path in ("/web/js/ok.js", "/web/inside.js", "/"):
        _, res = await client.get(path)
        assert res.status == 200, path
    for path in (
        "/web/.git/config",
        "/web/.env",
        "/web/.hidden.js",
        "/web/js/ok.js~",
        "/web/notes.md",
        "/web/link.js",
    ):
        _, res = await client.get(path)
        assert_not_found(res, path)


# -- keys mode -----------------------------------------------------------------------------------


async def test_keys_mode_serves_the_page_without_a_key_and_guards_the_data(
    make_settings: Any,
) -> None:
    async with running_app(make_settings(AUTH="keys")) as app:
        client = SanicASGITestClient(app)
        assert app.ctx.guard.mode == "keys"
        for path in ["/", *(url_of(p) for p in web_files())]:
            _, res = await client.get(path)
            assert res.status == 200, (path, res.status)
        _, docs = await client.get("/docs")
        assert docs.status == 200
        # The page is public; what it shows is not.
        for path in ("/api/images", "/api/stats", "/api/events"):
            _, res = await client.get(path)
            assert res.status == 401, path
            assert res.headers["www-authenticate"].startswith("Bearer")
