"""End-to-end check of a running imgapi stack; the compose `test` service runs it before pytest.

It uploads a generated photo (1600x1200, EXIF orientation 6, GPS) through the API, waits until the
thumbnail and EXIF jobs are done (in compose the API only enqueues, so a separate worker did them),
then checks what the API serves: both thumbnails, the EXIF coordinates, a rejected upload, stats.
It deletes what it uploaded, and waits for the Redis that the pytest run after it uses.
Exit code 0 when every check holds.

    IMGAPI_API_URL=http://localhost:8000 python tests/stack_check.py

Not named test_*.py: the normal pytest run must not collect it.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import redis
from PIL import Image, ImageOps

T = TypeVar("T")

API_URL = os.environ.get("IMGAPI_API_URL", "http://127.0.0.1:8000").rstrip("/")
REDIS_URL = os.environ.get("IMGAPI_TEST_REDIS_URL", "")
TIMEOUT_S = float(os.environ.get("STACK_CHECK_TIMEOUT", "120"))
# The stack runs in keys mode (it listens on 0.0.0.0): the check uses an admin key.
API_KEY = os.environ.get("IMGAPI_API_KEY", "")

# The Eiffel Tower: 48°51'30.24"N 2°17'40.2"E.
LATITUDE, LONGITUDE = 48.8584, 2.2945
STORED_SIZE = (1600, 1200)  # landscape as stored; orientation 6 shows it as 1200x1600 portrait
RED = (220, 20, 20)
BACKGROUND = (40, 90, 160)
THUMB_BOXES = {"small": 256, "medium": 768}


class CheckFailed(AssertionError):
    pass


class NotYet(Exception):
    """Raised by a wait_for probe: the stack is not there yet, ask again."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_for(what: str, probe: Callable[[], T], timeout: float = TIMEOUT_S) -> T:
    """Calls probe until it answers. NotYet and connection errors mean "ask again" (a container
    that is still starting refuses connections); the last one is reported at the deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    delay = 0.2
    while True:
        try:
            return probe()
        except NotYet as exc:
            last = str(exc)
        except (httpx.HTTPError, redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s (last: {last})")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def make_photo() -> bytes:
    """A JPEG whose stored top-left corner is red: upright (rotated 90° clockwise) the red block is
    at the top right. A random strip makes its sha256 new, so this run's jobs really run."""
    image = Image.new("RGB", STORED_SIZE, BACKGROUND)
    width, height = STORED_SIZE
    image.paste(RED, (0, 0, width // 4, height // 4))
    noise = Image.frombytes("L", (width, 8), secrets.token_bytes(width * 8)).convert("RGB")
    image.paste(noise, (0, height - 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    exif[0x010F] = "imgapi"  # Make
    exif[0x0110] = "stack check"  # Model
    exif.get_ifd(0x8825).update(  # GPS IFD
        {1: "N", 2: (48.0, 51.0, 30.24), 3: "E", 4: (2.0, 17.0, 40.2)}
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def check_heic(client: httpx.Client, photo: bytes) -> str:
    """An iPhone-style HEIC (made from the check's photo) is accepted and gets a WebP thumbnail."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    image = Image.open(io.BytesIO(photo))
    out = io.BytesIO()
    image.save(out, "HEIF", exif=image.getexif().tobytes())
    response = client.post(
        "/api/images", files={"file": ("IMG_0001.HEIC", out.getvalue(), "image/heic")}
    )
    expect(response.status_code == 201, f"HEIC upload: {response.status_code} {response.text}")
    data = response.json()["data"]
    meta = data["metadata"]
    shown = (meta["display_width"], meta["display_height"])
    expect(meta["format"] == "heic" and shown == STORED_SIZE[::-1], f"HEIC metadata: {meta}")
    thumb = client.get(
        f"/api/images/{data['image_id']}/thumbnails/small", headers={"Accept": "image/webp"}
    )
    expect(thumb.status_code == 200, f"HEIC thumbnail: {thumb.status_code}")
    expect(thumb.headers["content-type"] == "image/webp", f"thumbnail: {thumb.headers}")
    return data["image_id"]


def healthy(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/healthz")
    if response.status_code != 200:
        raise NotYet(f"/healthz answered {response.status_code}: {response.text}")
    return response.json()


def redis_ping(url: str) -> str:
    with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3) as client:
        client.ping()
    return "PONG"


def upload_photo(client: httpx.Client, photo: bytes) -> str:
    response = client.post("/api/images", files={"file": ("stack-check.jpg", photo, "image/jpeg")})
    expect(response.status_code == 201, f"upload: {response.status_code} {response.text}")
    body = response.json()
    expect(body.get("status") == "success" and body.get("error") is None, f"upload: {body}")
    data = body["data"]
    meta = data["metadata"]
    expect(
        (meta["width"], meta["height"], meta["format"]) == (*STORED_SIZE, "jpeg"),
        f"upload metadata: {meta}",
    )
    expect(meta["size_bytes"] == len(photo), f"size_bytes {meta['size_bytes']} != {len(photo)}")
    return data["image_id"]


def jobs_done(client: httpx.Client, image_id: str) -> dict[str, Any]:
    """The record once its thumbnail and EXIF jobs are done; NotYet while they are not."""
    response = client.get(f"/api/images/{image_id}")
    expect(response.status_code == 200, f"record: {response.status_code} {response.text}")
    data = response.json()["data"]
    states = {kind: data["jobs"].get(kind, {}).get("state") for kind in ("thumbnail", "exif")}
    for kind, state in states.items():
        # a failed job stays failed: no point in waiting
        expect(state != "failed", f"{kind} job failed: {data['jobs'][kind]}")
    if any(state != "done" for state in states.values()):
        raise NotYet(f"job states {states}")
    return data


def check_thumbnail(client: httpx.Client, image_id: str, size: str) -> tuple[int, int]:
    response = client.get(f"/api/images/{image_id}/thumbnails/{size}")
    expect(response.status_code == 200, f"{size}: {response.status_code} {response.text[:200]}")
    content_type = response.headers.get("content-type", "")
    expect(content_type.startswith("image/jpeg"), f"{size}: content type {content_type!r}")
    image = Image.open(io.BytesIO(response.content))
    expect(image.format == "JPEG", f"{size}: format {image.format}")
    orientation = image.getexif().get(0x0112)
    expect(orientation in (None, 1), f"{size}: carries EXIF orientation {orientation!r}")
    box = THUMB_BOXES[size]
    width, height = image.size
    # upright: portrait, long side on the box, 3:4 as the displayed photo
    expect(
        height == box and abs(width - box * 3 / 4) <= 1, f"{size}: {image.size}, want 3:4 in {box}"
    )
    rgb = ImageOps.exif_transpose(image).convert("RGB")  # no-op unless it carried orientation
    corners = {
        "top right": rgb.getpixel((width * 7 // 8, height // 16)),
        "top left": rgb.getpixel((width // 8, height // 16)),
        "bottom left": rgb.getpixel((width // 8, height * 3 // 4)),
    }
    expect(_near(corners["top right"], RED), f"{size}: not upright, corners {corners}")
    expect(not _near(corners["top left"], RED), f"{size}: not upright, corners {corners}")
    expect(not _near(corners["bottom left"], RED), f"{size}: not upright, corners {corners}")
    return image.size


def _near(pixel: Any, color: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=True))


def check_exif(record: dict[str, Any]) -> tuple[float, float]:
    exif = record["metadata"]["exif"]
    expect(isinstance(exif, dict), f"metadata.exif is {exif!r}")
    latitude, longitude = exif.get("latitude"), exif.get("longitude")
    expect(
        isinstance(latitude, float) and abs(latitude - LATITUDE) < 1e-3,
        f"latitude {latitude!r}, want about {LATITUDE}",
    )
    expect(
        isinstance(longitude, float) and abs(longitude - LONGITUDE) < 1e-3,
        f"longitude {longitude!r}, want about {LONGITUDE}",
    )
    expect(exif.get("Orientation") == 6, f"Orientation {exif.get('Orientation')!r}")
    return latitude, longitude


def check_rejected(client: httpx.Client) -> str:
    """A file that is not an image: a 4xx in the one error shape, and recorded as failed."""
    body = b"not an image, only text that claims to be one\n" * 20
    response = client.post("/api/images", files={"file": ("fake.jpg", body, "image/jpeg")})
    expect(400 <= response.status_code < 500, f"bad upload: {response.status_code}")
    content_type = response.headers.get("content-type", "")
    expect(content_type.startswith("application/json"), f"bad upload: content type {content_type}")
    answer = response.json()
    expect(answer.get("status") == "failed", f"bad upload: {answer}")
    expect(isinstance(answer.get("error"), str) and answer["error"], f"bad upload: {answer}")
    image_id = answer["data"]["image_id"]
    recorded = client.get(f"/api/images/{image_id}")
    expect(recorded.status_code == 200, f"failed upload not recorded: {recorded.status_code}")
    expect(recorded.json()["status"] == "failed", f"failed upload record: {recorded.json()}")
    return image_id


def check_stats(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/api/stats")
    expect(response.status_code == 200, f"stats: {response.status_code} {response.text}")
    stats = response.json()
    # at least this run's two uploads; volumes may hold earlier ones
    expect(stats["total"] >= 2 and stats["failed"] >= 1, f"stats counts: {stats}")
    expect(re.fullmatch(r"\d{1,3}\.\d\d%", stats["success_rate"]), f"success_rate: {stats}")
    average = stats["average_processing_time_seconds"]
    expect(
        isinstance(average, int | float) and not isinstance(average, bool) and average >= 0,
        f"average_processing_time_seconds: {average!r}",
    )
    return stats


def check_refused_without_key(image_id: str) -> str:
    with httpx.Client(base_url=API_URL, timeout=30) as anonymous:
        for method, path in (("GET", f"/api/images/{image_id}"), ("GET", "/api/stats")):
            response = anonymous.request(method, path)
            expect(response.status_code == 401, f"{method} {path} without a key: {response}")
            expect(
                response.headers.get("www-authenticate", "").startswith("Bearer"),
                "401 without WWW-Authenticate: Bearer",
            )
    return "401 with WWW-Authenticate"


def delete(client: httpx.Client, image_ids: list[str]) -> list[str]:
    """The check's own records go again: it may run against a stack that holds real data."""
    for image_id in image_ids:
        response = client.delete(f"/api/images/{image_id}")
        expect(response.status_code == 204, f"DELETE {image_id}: {response.status_code}")
        gone = client.get(f"/api/images/{image_id}")
        expect(gone.status_code == 404, f"{image_id} after DELETE: {gone.status_code}")
    return image_ids


def main() -> int:
    failures: list[str] = []

    def step(name: str, action: Callable[[], T], show: Callable[[T], object] = str) -> T | None:
        started = time.monotonic()
        try:
            result = action()
        except CheckFailed as exc:
            print(f"FAIL {name}: {exc}", flush=True)
            failures.append(name)
            return None
        print(f"ok   {name} ({time.monotonic() - started:.1f} s): {show(result)}", flush=True)
        return result

    def job_states(record: dict[str, Any]) -> dict[str, Any]:
        return {kind: job.get("error", job["state"]) for kind, job in record["jobs"].items()}

    print(f"stack check against {API_URL}", flush=True)
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    with httpx.Client(base_url=API_URL, timeout=30, headers=headers) as client:
        if step("api healthy", lambda: wait_for("GET /healthz", lambda: healthy(client))) is None:
            return 1
        if REDIS_URL:
            step("redis for pytest", lambda: wait_for(REDIS_URL, lambda: redis_ping(REDIS_URL)))
        photo = make_photo()
        image_id = step("upload a photo", lambda: upload_photo(client, photo))
        created = [image_id] if image_id else []
        if image_id is not None:
            record = step(
                "thumbnail and exif jobs done by the worker",
                lambda: wait_for("jobs done", lambda: jobs_done(client, image_id)),
                job_states,
            )
            if record is not None:
                for size in THUMB_BOXES:
                    step(
                        f"{size} thumbnail upright JPEG",
                        lambda size=size: check_thumbnail(client, image_id, size),
                    )
                step("exif latitude/longitude", lambda: check_exif(record))
        heic_id = step("a HEIC upload, served a WebP thumbnail", lambda: check_heic(client, photo))
        created += [heic_id] if heic_id else []
        rejected_id = step("bad upload rejected with a JSON 4xx", lambda: check_rejected(client))
        created += [rejected_id] if rejected_id else []
        step("stats", lambda: check_stats(client))
        if API_KEY:
            step("no key: 401", lambda: check_refused_without_key(created[0] if created else "x"))
        step("delete the check's records", lambda: delete(client, created))

    if failures:
        print(f"stack check FAILED: {', '.join(failures)}", flush=True)
        return 1
    print("stack check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
