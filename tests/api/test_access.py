"""Access control through the app: every route against no key, a bad key, a revoked key and each
scope; signed image URLs (tampering, expiry); delete tokens; public reads; the upload rate limit;
CORS and the security headers. Real processes: test_access_processes.py."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import db_query
import pytest
from conftest import multipart, running_app
from PIL import Image
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import settings as settings_mod
from imgapi_core.access import scopes, tokens
from imgapi_core.access.guard import resolve_mode
from imgapi_core.access.signing import BAD, EXPIRED, VALID, UrlSigner
from imgapi_core.store import ApiKey
from imgapi_core.timestamps import now_iso


def jpeg(colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, "JPEG")
    return out.getvalue()


async def make_key(app: Sanic, name: str, *granted: str) -> str:
    key_id, token = tokens.new_key_token()
    key = ApiKey(name, key_id, tokens.hash_token(token), granted, now_iso())
    await app.ctx.store.create_key(key)
    await app.ctx.guard.keys.reload()
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def db_count(cfg: settings_mod.Settings, table: str) -> int:
    return db_query.fetch(cfg, f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture
async def keys_app(make_settings: Callable[..., settings_mod.Settings]) -> AsyncIterator[Sanic]:
    async with running_app(make_settings(AUTH="keys")) as application:
        yield application


@pytest.fixture
def keys_client(keys_app: Sanic) -> SanicASGITestClient:
    return SanicASGITestClient(keys_app)


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# -- every route against every kind of caller ---------------------------------------------------

# (method, path template, the scope it needs; None: public)
ROUTES = [
    ("POST", "/api/images", scopes.UPLOAD),
    ("GET", "/api/images", scopes.READ),
    ("GET", "/api/images/{id}", scopes.READ),
    ("GET", "/api/images/{id}/thumbnails/small", scopes.READ),
    ("GET", "/api/images/{id}/original", scopes.READ),
    ("GET", "/api/stats", scopes.READ),
    ("DELETE", "/api/images/{id}", scopes.DELETE),
    ("GET", "/healthz", None),
    ("GET", "/docs/openapi.json", None),
]
CALLERS = ["none", "malformed", "unknown", "revoked", *scopes.SCOPES]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    ("method", "template", "needed"), ROUTES, ids=[f"{m} {t}" for m, t, _ in ROUTES]
)
async def test_every_route_against_every_caller(
    keys_app: Sanic, keys_client, caller: str, method: str, template: str, needed: str | None
):
    cfg = keys_app.ctx.settings
    admin = await make_key(keys_app, "setup", scopes.ADMIN)
    _, made = await keys_client.post("/api/images", files=multipart(jpeg()), headers=bearer(admin))
    assert made.status == 201
    image_id = made.json["data"]["image_id"]
    headers: dict[str, str] = {}
    if caller == "malformed":
        headers = {"Authorization": "Bearer not-a-key"}
    elif caller == "unknown":
        _, token = tokens.new_key_token()
        headers = bearer(token)
    elif caller == "revoked":
        token = await make_key(keys_app, "gone", scopes.ADMIN)
        assert await keys_app.ctx.store.revoke_key("gone", now_iso())
        await keys_app.ctx.guard.keys.reload()
        headers = bearer(token)
    elif caller in scopes.SCOPES:
        headers = {"X-API-Key": await make_key(keys_app, f"k-{caller}", caller)}
    images_before = db_count(cfg, "images")
    url = template.format(id=image_id)
    kwargs = {"files": multipart(jpeg((1, 2, 3)))} if method == "POST" else {}
    _, res = await keys_client.request(method, url, headers=headers, **kwargs)

    if needed is None:
        assert res.status == 200, res.text
        return
    if caller in ("none", "malformed", "unknown", "revoked"):
        assert res.status == 401, res.text
        assert res.headers["www-authenticate"].startswith("Bearer")
        assert res.json == {"status": "failed", "data": None, "error": res.json["error"]}
    elif scopes.grants((caller,), needed):
        assert res.status in (200, 201, 204), res.text
    else:
        assert res.status == 403, res.text
        assert needed in res.json["error"]
    if method == "POST" and res.status != 201:
        assert db_count(cfg, "images") == images_before  # a refused upload is not recorded


async def test_the_first_key_made_while_the_service_runs_works_at_once(keys_app, keys_client):
    _, res = await keys_client.get("/api/stats")
    assert res.status == 401
    key_id, token = tokens.new_key_token()
    # Made by another process (`imgapi.py keys create`): this process's cache has not seen it.
    await keys_app.ctx.store.create_key(
        ApiKey("new", key_id, tokens.hash_token(token), (scopes.READ,), now_iso())
    )
    keys_app.ctx.guard.keys._loaded_at -= 1  # the last reload was a while ago
    _, res = await keys_client.get("/api/stats", headers=bearer(token))
    assert res.status == 200


async def test_a_key_of_another_key_id_with_a_known_id_is_refused(keys_app, keys_client):
    token = await make_key(keys_app, "real", scopes.ADMIN)
    forged = token[:-5] + ("AAAAA" if not token.endswith("AAAAA") else "BBBBB")
    _, res = await keys_client.get("/api/stats", headers=bearer(forged))
    assert res.status == 401


# -- signed image URLs --------------------------------------------------------------------------


async def upload_with_key(app: Sanic, client) -> dict:
    token = await make_key(app, f"uploader-{uuid.uuid4().hex}", scopes.READ, scopes.UPLOAD)
    _, res = await client.post("/api/images", files=multipart(jpeg()), headers=bearer(token))
    assert res.status == 201, res.text
    return res.json


async def test_records_carry_signed_urls_that_work_without_a_key(keys_app, keys_client):
    body = await upload_with_key(keys_app, keys_client)
    urls = [*body["data"]["thumbnails"].values(), body["data"]["original"]]
    for url in urls:
        query = parse_qs(urlsplit(url).query)
        assert set(query) == {"exp", "sig"}, url
        _, res = await keys_client.get(path_of(url))
        assert res.status == 200, (url, res.text)
        left = int(query["exp"][0]) - int(res.headers["cache-control"].split("=")[-1])
        assert res.headers["cache-control"].startswith("private, max-age=")
        assert abs(left - int(keys_app.ctx.guard.signer.clock())) <= 2
        assert res.headers["etag"]
        # The bare URL needs a key.
        _, bare = await keys_client.get(urlsplit(url).path)
        assert bare.status == 401


async def test_a_tampered_or_expired_signed_url_is_403(keys_app, keys_client):
    body = await upload_with_key(keys_app, keys_client)
    other = await upload_with_key(keys_app, keys_client)
    url = path_of(body["data"]["thumbnails"]["small"])
    path, _, query = url.partition("?")
    q = parse_qs(query)
    exp, sig = q["exp"][0], q["sig"][0]
    tampered = [
        f"{path.replace('small', 'medium')}?exp={exp}&sig={sig}",  # another size
        f"/api/images/{other['data']['image_id']}/thumbnails/small?exp={exp}&sig={sig}",
        f"{path}?exp={int(exp) + 60}&sig={sig}",  # a later expiry
        f"{path}?exp={exp}&sig={sig[:-2]}xx",
        f"{path}?exp={exp}",
        f"{path}?exp=%C2%B2&sig={sig}",
        f"{path}?exp={'9' * 40}&sig={sig}",
    ]
    for bad in tampered:
        _, res = await keys_client.get(bad)
        assert res.status == 403, (bad, res.text)
        assert res.json["error"] == "signed URL is not valid"
    signer = keys_app.ctx.guard.signer
    real_clock = signer.clock
    signer.clock = lambda: real_clock() - 10 * signer.ttl_s  # signed long ago: expired by now
    old = path_of(f"http://x{path}?{signer.query(path)}")
    signer.clock = real_clock
    _, res = await keys_client.get(old)
    assert res.status == 403 and res.json["error"] == "signed URL expired"


async def test_a_signature_does_not_open_other_routes(keys_app, keys_client):
    body = await upload_with_key(keys_app, keys_client)
    image_id = body["data"]["image_id"]
    signer = keys_app.ctx.guard.signer
    for path in (f"/api/images/{image_id}", "/api/stats", "/api/images"):
        _, res = await keys_client.get(f"{path}?{signer.query(path)}")
        assert res.status == 401, path


def test_signer_rounds_expiry_up_and_verifies():
    now = 1_000_000.0
    signer = UrlSigner("secret", 3600, clock=lambda: now)
    query = parse_qs(signer.query("/p"))
    exp = int(query["exp"][0])
    assert exp % 300 == 0 and now + 3600 <= exp < now + 3600 + 300
    assert signer.query("/p") == signer.query("/p")  # stable within a step: cacheable
    assert signer.verify("/p", str(exp), query["sig"][0]) == VALID
    assert signer.verify("/q", str(exp), query["sig"][0]) == BAD
    assert (
        UrlSigner("other", 3600, clock=lambda: now).verify("/p", str(exp), query["sig"][0]) == BAD
    )
    later = UrlSigner("secret", 3600, clock=lambda: exp + 1.0)
    assert later.verify("/p", str(exp), query["sig"][0]) == EXPIRED


def another_database(
    request: pytest.FixtureRequest, cfg: settings_mod.Settings
) -> settings_mod.Settings:
    """The same settings on a database of its own (empty), on the same engine."""
    if not cfg.database_url:
        return cfg.replace(db_path=cfg.db_path + ".other")
    server = request.getfixturevalue("postgres_server")
    name = urlsplit(cfg.database_url).path.strip("/") + "_other"
    other = cfg.replace(database_url=server.create_database(name))
    assert other.database_url != cfg.database_url
    return other


async def test_url_secret_setting_signs_the_same_in_every_process(
    make_settings, request: pytest.FixtureRequest
):
    cfg = make_settings(AUTH="keys", URL_SECRET="shared-secret")
    async with running_app(cfg) as first:
        query = first.ctx.guard.signer.query("/api/images/x/original")
    other = another_database(request, cfg)
    async with running_app(other) as second:
        assert second.ctx.guard.signer.query("/api/images/x/original") == query
    # Without the setting each database keeps a secret of its own: the two really are apart.
    async with running_app(cfg.replace(url_secret="")) as first:
        own = first.ctx.guard.signer.query("/api/images/x/original")
    async with running_app(other.replace(url_secret="")) as second:
        assert second.ctx.guard.signer.query("/api/images/x/original") != own


# -- delete tokens --------------------------------------------------------------------------------


async def test_the_upload_delete_token_deletes_that_upload_only(keys_app, keys_client):
    first = await upload_with_key(keys_app, keys_client)
    second = await upload_with_key(keys_app, keys_client)
    token = first["delete_token"]
    assert token != second["delete_token"]
    first_id, second_id = first["data"]["image_id"], second["data"]["image_id"]
    for image_id, given in (
        (second_id, token),  # another upload's token
        (first_id, "x" * 43),
        (first_id, ""),
        ("no-such-image", token),  # same answer as a wrong token: ids are not revealed
    ):
        _, res = await keys_client.delete(
            f"/api/images/{image_id}", headers={"X-Delete-Token": given} if given else {}
        )
        assert res.status in (401, 403) if not given else res.status == 403, (image_id, res.text)
    # Without a key, and with a key that lacks the delete scope.
    _, res = await keys_client.delete(f"/api/images/{first_id}", headers={"X-Delete-Token": token})
    assert res.status == 204
    reader = await make_key(keys_app, "reader", scopes.READ)
    _, res = await keys_client.delete(
        f"/api/images/{second_id}",
        headers={**bearer(reader), "X-Delete-Token": second["delete_token"]},
    )
    assert res.status == 204
    admin = await make_key(keys_app, "admin", scopes.ADMIN)
    _, res = await keys_client.get(f"/api/images/{first_id}", headers=bearer(admin))
    assert res.status == 404
    assert db_count(keys_app.ctx.settings, "delete_tokens") == 0  # went with their records


# -- modes ----------------------------------------------------------------------------------------


async def test_open_mode_needs_no_key_and_serves_plain_urls(client):
    _, res = await client.post("/api/images", files=multipart(jpeg()))
    assert res.status == 201
    assert "delete_token" in res.json
    url = res.json["data"]["thumbnails"]["small"]
    assert "?" not in url and "?" not in res.json["data"]["original"]
    _, thumb = await client.get(path_of(url))
    assert thumb.status == 200
    assert thumb.headers["cache-control"] == "public, max-age=31536000, immutable"
    _, res = await client.delete(f"/api/images/{res.json['data']['image_id']}")
    assert res.status == 204


async def test_public_read_opens_reads_only(make_settings):
    async with running_app(make_settings(AUTH="keys", PUBLIC_READ="1")) as app:
        client = SanicASGITestClient(app)
        _, res = await client.post("/api/images", files=multipart(jpeg()))
        assert res.status == 401
        token = await make_key(app, "up", scopes.UPLOAD)
        _, res = await client.post("/api/images", files=multipart(jpeg()), headers=bearer(token))
        assert res.status == 201
        image_id = res.json["data"]["image_id"]
        assert "?" not in res.json["data"]["thumbnails"]["small"]  # nothing to sign
        for path in (f"/api/images/{image_id}", "/api/images", "/api/stats"):
            _, res = await client.get(path)
            assert res.status == 200, path
        _, res = await client.get(f"/api/images/{image_id}/original")
        assert res.status == 200
        assert res.headers["cache-control"].startswith("public")
        _, res = await client.delete(f"/api/images/{image_id}")
        assert res.status == 401


async def test_a_key_authenticated_image_is_not_for_shared_caches(keys_app, keys_client):
    body = await upload_with_key(keys_app, keys_client)
    token = await make_key(keys_app, "reader", scopes.READ)
    _, res = await keys_client.get(
        f"/api/images/{body['data']['image_id']}/original", headers=bearer(token)
    )
    assert res.status == 200
    assert res.headers["cache-control"] == "private, max-age=31536000, immutable"


@pytest.mark.parametrize(
    ("setting", "host", "unix", "mode"),
    [
        ("auto", "127.0.0.1", False, "open"),
        ("auto", "127.8.9.10", False, "open"),
        ("auto", "::1", False, "open"),
        ("auto", "[::1]", False, "open"),
        ("auto", "localhost", False, "open"),
        ("auto", "0.0.0.0", False, "keys"),
        ("auto", "::", False, "keys"),
        ("auto", "192.168.1.5", False, "keys"),
        ("auto", "example.com", False, "keys"),
        ("auto", None, False, "keys"),  # an ASGI server: the address is not known
        ("auto", None, True, "open"),  # a Unix socket
        ("open", "0.0.0.0", False, "open"),
        ("keys", "127.0.0.1", False, "keys"),
    ],
)
def test_auth_mode_follows_the_bind_address(setting, host, unix, mode):
    assert resolve_mode(setting, host, unix) == mode


# -- the upload rate limit ----------------------------------------------------------------------


async def test_uploads_over_the_rate_limit_are_429_and_not_recorded(make_settings):
    cfg = make_settings(AUTH="keys", UPLOAD_RATE_LIMIT="2/minute")
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        one = await make_key(app, "one", scopes.UPLOAD)
        two = await make_key(app, "two", scopes.UPLOAD)
        for _ in range(2):
            _, res = await client.post("/api/images", files=multipart(jpeg()), headers=bearer(one))
            assert res.status == 201
        _, res = await client.post("/api/images", files=multipart(jpeg()), headers=bearer(one))
        assert res.status == 429
        assert 1 <= int(res.headers["retry-after"]) <= 60
        assert res.json == {"status": "failed", "data": None, "error": res.json["error"]}
        assert "2/minute" in res.json["error"]
        assert db_count(cfg, "images") == 2
        _, res = await client.post("/api/images", files=multipart(jpeg()), headers=bearer(two))
        assert res.status == 201  # per key


async def test_open_mode_limits_per_client_address(make_settings):
    async with running_app(make_settings(UPLOAD_RATE_LIMIT="1/minute")) as app:
        client = SanicASGITestClient(app)
        _, res = await client.post("/api/images", files=multipart(jpeg()))
        assert res.status == 201
        _, res = await client.post("/api/images", files=multipart(jpeg()))
        assert res.status == 429


@pytest.mark.parametrize(
    ("raw", "ok"),
    [("120/minute", True), ("10 per second", True), ("0", True), ("", True), ("fast", False)],
)
def test_rate_limit_setting_is_checked_at_start(raw, ok):
    env = {"UPLOAD_RATE_LIMIT": raw}
    if ok:
        settings_mod.load(env=env, dotenv=None)
    else:
        with pytest.raises(settings_mod.SettingsError, match="UPLOAD_RATE_LIMIT"):
            settings_mod.load(env=env, dotenv=None)


# -- CORS and security headers -----------------------------------------------------------------


async def test_cors_allows_the_configured_origins_only(make_settings):
    async with running_app(make_settings(CORS_ORIGINS="https://app.example")) as app:
        client = SanicASGITestClient(app)
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        _, res = await client.options(
            "/api/images", headers={"Origin": "https://app.example", **preflight}
        )
        assert res.status == 204
        assert res.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in res.headers["access-control-allow-headers"].lower()
        _, res = await client.get("/api/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in res.headers


async def test_no_cors_by_default(client):
    _, res = await client.get("/api/stats", headers={"Origin": "https://app.example"})
    assert res.status == 200 and "access-control-allow-origin" not in res.headers


async def test_images_are_sandboxed_and_never_sniffed(client):
    _, res = await client.post("/api/images", files=multipart(jpeg()))
    assert res.headers["x-content-type-options"] == "nosniff"
    image_id = res.json["data"]["image_id"]
    for path in (f"/api/images/{image_id}/original", f"/api/images/{image_id}/thumbnails/small"):
        _, res = await client.get(path)
        assert res.status == 200
        assert res.headers["x-content-type-options"] == "nosniff"
        assert res.headers["content-security-policy"] == "default-src 'none'; sandbox"
    _, res = await client.get("/api/nowhere")
    assert res.status == 404 and res.headers["x-content-type-options"] == "nosniff"
