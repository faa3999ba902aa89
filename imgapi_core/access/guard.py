"""The request guard: applies the access mode, keys and scopes, signed URLs and the upload rate
limit to every request before its handler runs. Refusals write no record and, for an upload, read
no body: the connection closes after the answer."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from sanic import HTTPResponse, Request

from imgapi_core import records
from imgapi_core.access import scopes
from imgapi_core.access.keys import KeyCache
from imgapi_core.access.ratelimit import UploadLimiter
from imgapi_core.access.signing import EXPIRED, VALID, UrlSigner
from imgapi_core.routes import json_response
from imgapi_core.settings import Settings
from imgapi_core.store import ApiKey, Store

log = logging.getLogger("imgapi.access")

OPEN, KEYS = "open", "keys"
URL_SECRET = "url-signing"
# The routes whose URLs are signed in records and which accept such a URL instead of a key.
SIGNED_ROUTES = ("media.get_thumbnail", "media.get_original")


def is_image_route(route_name: str) -> bool:
    """Whether a route (Sanic's "app.blueprint.name") serves image bytes."""
    return route_name.split(".", 1)[-1] in SIGNED_ROUTES


# Routes that others register (sanic-ext's /docs): public, as the API's description.
PUBLIC_PREFIXES = ("openapi.",)
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_mode(setting: str, host: str | None, unix: bool = False) -> str:
    """AUTH=auto is open only where nothing but this machine can connect (Redis's protected
    mode): a loopback address or a Unix socket. An unknown bind address (an ASGI server) is keys."""
    if setting != "auto":
        return setting
    return OPEN if unix or is_loopback(host) else KEYS


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key, a signed URL, or anyone (open mode, public routes)."""

    key: ApiKey | None = None
    signed_exp: str | None = None

    @property
    def identity(self) -> str | None:
        return self.key.name if self.key else None


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


class Guard:
    def __init__(
        self,
        settings: Settings,
        mode: str,
        keys: KeyCache,
        signer: UrlSigner,
        limiter: UploadLimiter | None,
    ) -> None:
        self.settings = settings
        self.mode = mode
        self.keys = keys
        self.signer = signer
        self.limiter = limiter

    @property
    def signs_urls(self) -> bool:
        return self.mode == KEYS and not self.settings.public_read

    async def close(self) -> None:
        await self.keys.close()

    async def check(self, request: Request) -> HTTPResponse | None:
        """None to let the request through (request.ctx.caller says who it is), or the refusal."""
        request.ctx.caller = Caller()
        route = request.route
        if route is None or request.method == "OPTIONS":
            return None  # no such route (a 404 says nothing), or a CORS preflight
        needed = scopes.access_of(route.handler)
        if needed == scopes.PUBLIC or route.name.split(".", 1)[-1].startswith(PUBLIC_PREFIXES):
            return None
        switch = scopes.public_when_of(route.handler)
        if switch is not None and getattr(self.settings, switch) is True:
            return None  # made public by the operator (e.g. METRICS_PUBLIC=1)
        if self.mode == KEYS:
            refusal = await self._check_keys(request, route.name, needed)
            if refusal is not None:
                return refusal
        if needed == scopes.UPLOAD and self.limiter is not None:
            return await self._check_rate(request)
        return None

    async def _check_keys(
        self, request: Request, name: str, needed: str | None
    ) -> HTTPResponse | None:
        if needed is None:
            # Undeclared: only an admin key may call it.
            needed = scopes.ADMIN
        if needed == scopes.READ and self.settings.public_read:
            return None
        args = request.args
        if needed == scopes.READ and is_image_route(name) and ("sig" in args or "exp" in args):
            verdict = self.signer.verify(request.path, args.get("exp"), args.get("sig"))
            if verdict == VALID:
                request.ctx.caller = Caller(signed_exp=args.get("exp"))
                return None
            message = "signed URL expired" if verdict == EXPIRED else "signed URL is not valid"
            return refuse(request, 403, message)
        token = bearer_token(request)
        if token is None:
            if needed == scopes.DELETE and request.headers.get("x-delete-token"):
                return None  # the handler checks the upload's delete token
            return refuse(request, 401, "an API key is required (Authorization: Bearer KEY)")
        key = await self.keys.check(token)
        if key is None:
            return refuse(request, 401, "the API key is not valid (unknown or revoked)")
        request.ctx.caller = Caller(key=key)
        if not scopes.grants(key.scopes, needed):
            if needed == scopes.DELETE and request.headers.get("x-delete-token"):
                return None
            return refuse(request, 403, f"the API key {key.name!r} lacks the {needed!r} scope")
        return None

    async def _check_rate(self, request: Request) -> HTTPResponse | None:
        assert self.limiter is not None
        caller: Caller = request.ctx.caller
        identity = (
            f"key:{caller.identity}"
            if caller.identity
            else f"ip:{request.remote_addr or request.ip}"
        )
        wait = await self.limiter.hit(identity)
        if wait is None:
            return None
        response = refuse(
            request, 429, f"too many uploads: limit {self.settings.upload_rate_limit}"
        )
        response.headers["Retry-After"] = str(int(wait))
        return response

    def cache_control(self, request: Request) -> str:
        """For image bytes: shared caches may keep them only where anyone may read them."""
        caller: Caller | None = getattr(request.ctx, "caller", None)
        if caller is not None and caller.signed_exp is not None:
            return f"private, max-age={self.signer.seconds_left(caller.signed_exp)}"
        if self.mode == KEYS and not self.settings.public_read:
            return "private, max-age=31536000, immutable"
        return "public, max-age=31536000, immutable"

    def may_delete(self, request: Request) -> bool:
        """Whether the caller may delete any image (else only with the upload's delete token)."""
        if self.mode == OPEN:
            return True
        key = request.ctx.caller.key
        return key is not None and scopes.grants(key.scopes, scopes.DELETE)


def refuse(request: Request, status: int, message: str) -> HTTPResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="imgapi"'} if status == 401 else {}
    stream = getattr(request, "stream", None)
    if request.route is not None and request.route.extra.stream and stream is not None:
        # An upload refused before its body was read: do not read it, close after the answer
        # (and send no 100 Continue).
        stream.expecting_continue = False
        stream.keep_alive = False
        stream.request_body = None
    return json_response(records.failure(message), status=status, headers=headers)


async def open_guard(store: Store, settings: Settings, host: str | None, unix: bool) -> Guard:
    mode = resolve_mode(settings.auth, host, unix)
    keys = KeyCache(store)
    if mode == KEYS:  # open mode checks no key: nothing to load or keep fresh
        await keys.start()
    secret = settings.url_secret or await store.secret(URL_SECRET, _new_secret)
    limiter = None
    if settings.upload_rate_limit:
        limiter = UploadLimiter(
            settings.upload_rate_limit, settings.redis_url, f"{settings.arq_queue}:ratelimit"
        )
    guard = Guard(settings, mode, keys, UrlSigner(secret, settings.signed_url_ttl), limiter)
    if mode == KEYS and keys.empty:
        log.warning(
            "AUTH=keys and no API key yet: every request but /healthz and /docs gets a 401."
            " Make the first one with: python imgapi.py keys create admin --scopes admin"
        )
    if settings.auth == OPEN:
        log.warning(open_warning(host, unix))
    return guard


def open_warning(host: str | None, unix: bool) -> str:
    """The one line an AUTH=open set on purpose logs at start (AUTH=auto resolved to open, on a
    loopback address or a Unix socket, logs none: nothing but this machine can connect)."""
    where = "a Unix socket" if unix else (host or "the ASGI server's address")
    reach = "it"
    if not unix and host is not None and not is_loopback(host):
        where += " (NOT a loopback address)"
        reach = "it from any machine on the network"
    return (
        f"AUTH=open on {where}: no API key is checked; anyone who can reach {reach} can read and"
        " delete every image (AUTH=keys requires keys)"
    )


def _new_secret() -> str:
    import secrets

    return secrets.token_urlsafe(32)
