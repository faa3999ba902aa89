"""Webhooks: every image.ready and job.failed event POSTed to each WEBHOOK_URL, signed, retried
with backoff until it is delivered or WEBHOOK_MAX_ATTEMPTS is spent, then kept as failed until an
admin sends it again.

The store writes the delivery rows in the transaction of their event, so a crash loses none. This
sender claims due ones under a lease (one process sends each; a process that dies mid-send leaves
its deliveries to the next claim once the lease lapses), sends a few at a time and records how
each went. The event hub wakes it within milliseconds of a new event; a slow poll finds the
retries that came due and deliveries committed by other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
import urllib.parse
from collections.abc import Callable
from typing import NamedTuple

import httpx
import orjson

from imgapi_core import records
from imgapi_core.cancelling import cancel_all
from imgapi_core.events.hub import EventHub
from imgapi_core.settings import Settings
from imgapi_core.store import WEBHOOK_EVENTS, Delivery, Event, Store

log = logging.getLogger("imgapi.webhooks")

USER_AGENT = "imgapi-webhooks"
POLL_S = 1.0
CONCURRENCY = 4
MAX_BACKOFF_S = 300.0
# Time beyond the request's own timeout (reading the record, recording the outcome) before another
# process may take a delivery over: a lease shorter than one attempt would send it twice.
LEASE_MARGIN_S = 30.0
# A shutdown waits this long at most to hand an interrupted delivery back.
RELEASE_S = 5.0
NOT_CONFIGURED = "URL no longer configured"

Backoff = Callable[[int], float]


def sign(secret: str, body: bytes) -> str:
    """The X-Imgapi-Signature value: HMAC-SHA256 of the raw body, keyed with WEBHOOK_SECRET."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers(delivery: Delivery, body: bytes, secret: str) -> dict[str, str]:
    """The headers of one attempt. X-Imgapi-Delivery is the same on every retry of a delivery,
    so a receiver that got an attempt whose answer was lost can recognise the next one."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Imgapi-Event": delivery.event_type,
        "X-Imgapi-Delivery": delivery.delivery_id,
        "X-Imgapi-Signature": sign(secret, body),
    }


def backoff_s(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: doubling up to 5 minutes, with
    jitter, so that deliveries that failed together (a receiver down) do not all return at once."""
    return min(MAX_BACKOFF_S, 2.0 ** min(attempts, 16)) * random.uniform(0.75, 1.0)


class Outcome(NamedTuple):
    state: str  # delivered, failed, or pending (to be tried again at retry_at)
    status: int | None
    error: str | None
    retry_at: float = 0.0


class WebhookSender:
    """One per API process; several processes share the work through the store's claims."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hub: EventHub,
        url: records.Url,
        runner_id: str,
        *,
        backoff: Backoff = backoff_s,
        poll_s: float = POLL_S,
        concurrency: int = CONCURRENCY,
        lease_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.url = url
        self.runner_id = runner_id
        self.backoff = backoff
        self.poll_s = poll_s
        self.concurrency = concurrency
        self.lease_s = settings.webhook_timeout + LEASE_MARGIN_S if lease_s is None else lease_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            # A delivery goes to the configured URL and nowhere else: a 3xx is a failed attempt.
            follow_redirects=False,
            timeout=self.settings.webhook_timeout,
            transport=self._transport,
        )
        self.hub.on_event(self._heard)
        self._task = asyncio.create_task(self._run(), name="imgapi-webhooks")

    def _heard(self, event: Event) -> None:
        # The hub reads an event after its transaction committed, deliveries included.
        if event.type in WEBHOOK_EVENTS:
            self.wake()

    def wake(self) -> None:
        """Look for due deliveries now (new events, a manual retry) rather than at the next poll."""
        if not self._closed:
            self._wake.set()

    async def _run(self) -> None:
        while not self._closed:
            # Cleared before the claim: a wake-up that comes during it starts the next round.
            self._wake.clear()
            free = self.concurrency - len(self._sending)
            if free > 0:
                for delivery in await self._claim(free):
                    task = asyncio.create_task(
                        self._deliver(delivery), name=f"imgapi-webhook-{delivery.delivery_id}"
                    )
                    self._sending.add(task)
                    task.add_done_callback(self._sent)
            # Not asyncio.wait_for: on 3.11 it swallows a cancellation that comes as the wait
            # ends (a wake-up and close() together), and close() would then wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()

    def _wake_at(self, epoch_s: float) -> None:
        """A wake-up when a retry sooner than the next poll comes due (later ones the poll
        finds within poll_s), so that a short backoff is what it says."""
        delay = max(0.0, epoch_s - time.time())
        if delay >= self.poll_s:
            return
        loop = asyncio.get_running_loop()
        self._timers = {t for t in self._timers if t.when() > loop.time()}
        # A hair late: the claim compares with the wall clock, the timer runs on the loop's.
        self._timers.add(loop.call_later(delay + 0.01, self.wake))

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        # A free slot: more may be due than the last claim could take.
        self.wake()

    async def _claim(self, limit: int) -> list[Delivery]:
        try:
            return await self.store.claim_deliveries(self.runner_id, limit, self.lease_s)
        except Exception as exc:  # the database is busy or gone: the next round tries again
            log.warning("cannot claim webhook deliveries: %s: %s", type(exc).__name__, exc)
            return []

    async def _deliver(self, delivery: Delivery) -> None:
        body = delivery.body.encode() if delivery.body is not None else None
        outcome: Outcome | None = None
        try:
            if body is None:
                kept = await self.store.keep_delivery_body(
                    delivery.delivery_id, self.runner_id, (await self._body(delivery)).decode()
                )
                if kept is None:
                    log.info("webhook delivery %s was taken over", delivery.delivery_id)
                    return
                body = kept.encode()
            if delivery.url not in self.settings.webhook_url:
                outcome = Outcome("failed", None, NOT_CONFIGURED)
            else:
                outcome = self._judge(delivery, *await self._post(delivery, body))
            await self._finish(delivery, body, outcome)
            if outcome.state == "pending":
                self._wake_at(outcome.retry_at)
        except asyncio.CancelledError:
            # A shutdown: the delivery goes back to pending (or to what its attempt came to)
            # rather than waiting for its lease to lapse.
            if body is not None:
                await self._release(delivery, body, outcome)
            raise
        except Exception:
            # Its lease lapses and a later claim takes it again.
            log.exception("webhook delivery %s failed unexpectedly", delivery.delivery_id)

    async def _body(self, delivery: Delivery) -> bytes:
        """The event and the image's record as it is now (null once deleted), built once: the
        store keeps the first body sent, and every retry sends those same bytes."""
        rec, jobs = await self.store.record_with_jobs(delivery.image_id)
        record = records.record(rec, jobs, self.url) if rec is not None else None
        # The store wrote event_json as JSON: spliced in as it is.
        return records.dumps({"event": orjson.Fragment(delivery.event_json), "record": record})

    async def _post(self, delivery: Delivery, body: bytes) -> tuple[int | None, str | None]:
        """(HTTP status, None) when the receiver answered, else (None, what went wrong)."""
        assert self._client is not None
        timeout = self.settings.webhook_timeout
        try:
            # httpx times each read and write on its own; this bounds the whole attempt, so that a
            # receiver trickling its answer cannot outlast the lease.
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    "POST",
                    delivery.url,
                    content=body,
                    headers=headers(delivery, body, self.settings.webhook_secret),
                ) as response,
            ):
                # The answer's body is never read: only its status counts.
                return response.status_code, None
        except TimeoutError:
            return None, f"no answer within WEBHOOK_TIMEOUT ({timeout:g} s)"
        except Exception as exc:  # refused, reset, DNS, TLS, a bad URL: all a failed attempt
            return None, f"{type(exc).__name__}: {exc}".rstrip(": ")

    def _judge(self, delivery: Delivery, status: int | None, error: str | None) -> Outcome:
        if status is not None and 200 <= status < 300:
            return Outcome("delivered", status, None)
        if status is not None:
            error = f"HTTP {status}"
            if 300 <= status < 400:
                error += ": redirects are not followed"
        if delivery.attempts >= self.settings.webhook_max_attempts:
            log.warning(
                "webhook delivery %s to %s failed after %d attempts: %s",
                delivery.delivery_id,
                _host(delivery.url),
                delivery.attempts,
                error,
            )
            return Outcome("failed", status, error)
        return Outcome("pending", status, error, time.time() + self.backoff(delivery.attempts))

    async def _finish(self, delivery: Delivery, body: bytes, outcome: Outcome) -> None:
        kept = await self.store.finish_delivery(
            delivery.delivery_id,
            self.runner_id,
            state=outcome.state,
            status=outcome.status,
            error=outcome.error,
            body=body.decode(),
            retry_at=outcome.retry_at,
        )
        if not kept:
            # Its lease lapsed and another process took it over (that one records the outcome), or
            # a shutdown came while its outcome was being recorded.
            log.info("webhook delivery %s is no longer held by this runner", delivery.delivery_id)

    async def _release(self, delivery: Delivery, body: bytes, outcome: Outcome | None) -> None:
        # An attempt cut short may have reached the receiver: it dedupes by X-Imgapi-Delivery.
        outcome = outcome or Outcome("pending", None, "interrupted by a shutdown")
        try:
            async with asyncio.timeout(RELEASE_S):
                await self._finish(delivery, body, outcome)
        except Exception as exc:  # the lease lapses instead, and the next start sends it
            log.warning(
                "cannot release webhook delivery %s: %s: %s",
                delivery.delivery_id,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        await cancel_all([t for t in (self._task, *self._sending) if t is not None])
        self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _host(url: str) -> str:
    # Logs name the receiver's host only: a URL's path or query may carry a token.
    return urllib.parse.urlsplit(url).hostname or "?"
