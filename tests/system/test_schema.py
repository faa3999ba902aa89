"""schemathesis against the OpenAPI document the live API serves (/docs/openapi.json): for every
operation, generated requests (valid and invalid) get no server error, and every answer conforms
to the document: a documented status code, content type, headers and body schema. A real API
process (mode 1) answers over HTTP; the examples per operation are bounded.

The document is fetched from the running server inside each test and driven through
schemathesis's Python API (operation.as_strategy + hypothesis), since its lazy pytest loader
(schemathesis.pytest.from_fixture) breaks on pytest 9 (`Function._nodeid`)."""

from __future__ import annotations

import io
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from procs import REPO, Proc, run_command, settings_for, start_api
from schemathesis import GenerationMode, checks

from imgapi_core.access.scopes import PUBLIC, access_of
from imgapi_core.app import BLUEPRINTS
from imgapi_core.openapi_spec import ACCESS, PATHS, SPEC

pytestmark = [pytest.mark.slow]

EXAMPLES = 30
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
OPERATIONS = [
    (method.upper(), path)
    for path, item in PATHS.items()
    for method in item
    if method != "parameters"
]
# A stream that does not end cannot be generated against; tests/api/test_events.py checks it.
STREAMS = {("GET", "/api/events")}


def _negatable(method: str, path: str) -> bool:
    """Whether schemathesis can make invalid requests for the operation: it needs a body or a
    parameter with a constraint to break (a bare string path parameter has none)."""
    item = PATHS[path]
    operation = item[method.lower()]
    parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
    return "requestBody" in operation or any(
        set(p["schema"]) - {"type", "description"} or p["schema"].get("type") != "string"
        for p in parameters
    )


CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in GenerationMode
    if (method, path) not in STREAMS
    and (mode is GenerationMode.POSITIVE or _negatable(method, path))
]


@dataclass
class Live:
    api: Proc
    root: Path
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, data: bytes, name: str) -> str:
        res = httpx.post(
            self.api.url + "/api/images",
            files={"file": (name, data, "image/jpeg")},
            headers=self.headers,
            timeout=30,
        )
        assert res.status_code in (201, 400, 415), res.text
        return res.json()["data"]["image_id"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("schema")
    # Keys mode, as a deployment runs: the operations are driven with an admin key.
    env = settings_for(root, MAX_UPLOAD_BYTES="1000000", REQUEST_TIMEOUT="5", AUTH="keys")
    made = run_command(
        [sys.executable, "imgapi.py", "keys", "create", "schema", "--scopes", "admin"], env, REPO
    )
    assert made.returncode == 0, made.stderr
    api = start_api(env, root / "api.log")
    try:
        yield Live(api, root, made.stdout.splitlines()[-1])
    finally:
        api.kill()


def photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (seed % 256, 80, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def served_document(live: Live) -> dict:
    res = httpx.get(live.api.url + "/docs/openapi.json", timeout=10)
    assert res.status_code == 200
    return res.json()


def assert_served_as_written(document: dict, method: str, path: str) -> None:
    """Without this, schemathesis would check an auto-generated document that allows anything."""
    served = document["paths"].get(path, {}).get(method.lower())
    assert served is not None, f"{method} {path} is not in /docs/openapi.json"
    written = SPEC["paths"][path][method.lower()]
    assert sorted(served["responses"]) == sorted(written["responses"]), (
        f"{method} {path}: /docs/openapi.json documents responses {sorted(served['responses'])}, "
        f"openapi_spec.py {sorted(written['responses'])}"
    )
    assert ("requestBody" in served) == ("requestBody" in written), "requestBody differs"


def test_served_document_is_the_contract(live: Live) -> None:
    document = served_document(live)
    assert set(document["paths"]) == set(PATHS)
    for method, path in OPERATIONS:
        assert_served_as_written(document, method, path)


def run_operation(live: Live, method: str, path: str, mode: GenerationMode, **fixed: str) -> None:
    assert_served_as_written(served_document(live), method, path)
    schema = schemathesis.openapi.from_url(live.api.url + "/docs/openapi.json")
    operation = schema[path][method]
    secrets = (str(live.root), str(live.root.resolve()))
    path_parameters = {"image_id": fixed["image_id"]} if fixed else None

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=CHECKS, headers=live.headers)
        text = response.text if "json" in str(response.headers.get("content-type")) else ""
        for secret in secrets:
            assert secret not in text and secret not in str(response.headers), secret

    run()
    assert live.api.popen.poll() is None, "the API died:\n" + live.api.output()[-3000:]
    assert "unhandled error" not in live.api.output()


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES]
)
def test_operation_conforms(live: Live, method: str, path: str, mode: GenerationMode) -> None:
    run_operation(live, method, path, mode)


IMAGE_OPERATIONS = [(m, p) for m, p in OPERATIONS if "{image_id}" in p]


@pytest.mark.parametrize("stored", ["success", "failure"])
@pytest.mark.parametrize(
    ("method", "path"), IMAGE_OPERATIONS, ids=[f"{m} {p}" for m, p in IMAGE_OPERATIONS]
)
def test_operation_on_a_stored_upload_conforms(
    live: Live, method: str, path: str, stored: str
) -> None:
    """The same with the id of a real upload (a stored image, or a recorded failure), so the
    success answers (records, thumbnails, originals, 204) are checked against the document too."""
    seed = uuid.uuid4().int
    data = photo(seed) if stored == "success" else b"not an image at all"
    image_id = live.upload(data, f"{seed}.jpg")
    run_operation(live, method, path, GenerationMode.POSITIVE, image_id=image_id)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_protected_operation_is_401_without_a_key(live: Live, method: str, path: str) -> None:
    operation = PATHS[path][method.lower()]
    url = live.api.url + path.format(image_id="whatever", size="small", kind="exif")
    res = httpx.request(method, url, timeout=10)
    if ACCESS[operation["operationId"]] is None:
        assert res.status_code != 401, res.text
        return
    assert res.status_code == 401, res.text
    assert res.headers["www-authenticate"].startswith("Bearer")
    assert res.json() == {"status": "failed", "data": None, "error": res.json()["error"]}


def test_the_document_says_what_each_route_declares() -> None:
    """openapi_spec.ACCESS (what the document tells clients) and the scopes the routes declare
    (what the guard enforces) are one rule: every operation is both, identically."""
    declared = {}
    for bp in BLUEPRINTS:
        for route in bp._future_routes:
            access = access_of(route.handler)
            assert access is not None, f"{route.name} declares no access"
            declared[route.name.split(".")[-1]] = None if access == PUBLIC else access
    assert declared == ACCESS
