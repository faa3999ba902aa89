"""The OpenAPI document of the API contract, written out rather than inferred from handlers, so
that its schemas say exactly what the responses hold (schemathesis checks them)."""

from __future__ import annotations

from typing import Any


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("Error", description)


_IMAGE_ID = {
    "name": "image_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "the id the upload answered with",
}

_NULLABLE_STRING = {"type": "string", "nullable": True}


def _string_header(description: str) -> dict[str, Any]:
    return {"schema": {"type": "string"}, "description": description}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, **_string_header(description)}


_ORIGINAL_HEADERS = {
    "Content-Length": {"schema": {"type": "integer", "minimum": 0}},
    "ETag": _string_header('strong: "<sha256 of the bytes>"'),
    "Last-Modified": _string_header("the upload's processed_at, as an HTTP-date"),
    "Accept-Ranges": _string_header("bytes"),
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ORIGINAL_CONTENT = {
    content_type: _BINARY
    for content_type in (
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/tiff",
        "image/avif",
        "image/heic",
    )
}
_THUMBNAIL_CONTENT = {t: _BINARY for t in ("image/jpeg", "image/webp", "image/avif")}

# With S3_REDIRECT=1 (and STORAGE_URL) a GET, once allowed, is sent to the object store.
_S3_REDIRECT = {
    "description": "S3_REDIRECT=1: the bytes are at a presigned URL of the object store",
    "headers": {
        "Location": _string_header("the presigned URL"),
        "Cache-Control": _string_header("private, max-age=SECONDS"),
    },
}

_JOB = {
    "type": "object",
    "required": ["state", "attempts"],
    "properties": {
        "state": {
            "type": "string",
            "enum": ["queued", "running", "done", "failed", "skipped", "unavailable"],
            "description": "unavailable: it could not run here (captioning not installed, no"
            " model); error says why",
        },
        "attempts": {"type": "integer", "minimum": 0},
        "error": _NULLABLE_STRING,
    },
}

SCHEMAS: dict[str, Any] = {
    "Metadata": {
        "type": "object",
        "description": "empty for a failed upload",
        "properties": {
            "width": {"type": "integer", "description": "as stored, before the orientation"},
            "height": {"type": "integer"},
            "display_width": {"type": "integer", "description": "as shown, after it"},
            "display_height": {"type": "integer"},
            "orientation": {"type": "integer", "minimum": 1, "maximum": 8},
            "frames": {"type": "integer", "minimum": 1, "description": "1 for a still"},
            "format": {
                "type": "string",
                "enum": ["jpeg", "png", "webp", "gif", "tiff", "avif", "heic"],
            },
            "size_bytes": {"type": "integer"},
            "sha256": {"type": "string"},
            "first_upload": {"type": "string"},
            "exif": {"type": "object", "nullable": True, "additionalProperties": True},
            "caption": _NULLABLE_STRING,
            "taken_at": {
                **_NULLABLE_STRING,
                "description": "EXIF DateTimeOriginal, YYYY-MM-DDTHH:MM:SS on the camera's clock",
            },
        },
    },
    "Thumbnails": {
        "type": "object",
        "description": "absolute URLs; empty for a failed upload",
        "properties": {"small": {"type": "string"}, "medium": {"type": "string"}},
    },
    "Jobs": {
        "type": "object",
        "description": "state of each background job; empty for a failed upload",
        "properties": {"thumbnail": _JOB, "exif": _JOB, "caption": _JOB},
    },
    "RecordData": {
        "type": "object",
        "required": ["image_id", "original_name", "processed_at", "metadata", "thumbnails"],
        "properties": {
            "image_id": {"type": "string"},
            "original_name": {"type": "string"},
            "processed_at": {"type": "string", "description": "RFC 3339, UTC"},
            "metadata": {"$ref": "#/components/schemas/Metadata"},
            "thumbnails": {"$ref": "#/components/schemas/Thumbnails"},
            "original": {
                "type": "string",
                "description": "absolute URL of the original (signed in keys mode)",
            },
            "jobs": {"$ref": "#/components/schemas/Jobs"},
            "ready": {
                "type": "boolean",
                "description": "every job finished (done, failed, skipped or unavailable)",
            },
        },
    },
    "Record": {
        "type": "object",
        "required": ["status", "data", "thumbnails", "error"],
        "properties": {
            "status": {"type": "string", "enum": ["success", "failed"]},
            "data": {"$ref": "#/components/schemas/RecordData"},
            "thumbnails": {"$ref": "#/components/schemas/Thumbnails"},
            "error": _NULLABLE_STRING,
            "delete_token": {
                "type": "string",
                "description": "upload answer only, shown once: DELETE with X-Delete-Token",
            },
        },
    },
    "Error": {
        "type": "object",
        "description": "the one error shape; `data` holds the recorded upload for upload errors",
        "required": ["status", "data", "error"],
        "properties": {
            "status": {"type": "string", "enum": ["failed"]},
            "data": {
                "nullable": True,
                "allOf": [{"$ref": "#/components/schemas/RecordData"}],
            },
            "error": {"type": "string"},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["total", "failed", "success_rate", "average_processing_time_seconds"],
        "properties": {
            "total": {"type": "integer"},
            "failed": {"type": "integer"},
            "success_rate": {"type": "string", "example": "75.00%"},
            "average_processing_time_seconds": {
                "type": "number",
                "description": "upload start to its last job's end, over finished uploads",
            },
            "processing": {"type": "integer", "description": "uploads with jobs still open"},
            "queued_jobs": {"type": "integer"},
            "failed_jobs": {"type": "integer"},
            "jobs": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "JobRetry": {
        "type": "object",
        "required": ["image_id", "kind", "state", "attempts"],
        "properties": {
            "image_id": {"type": "string"},
            "kind": {"type": "string", "enum": ["thumbnail", "exif", "caption"]},
            "state": {"type": "string", "enum": ["queued"]},
            "attempts": {"type": "integer", "minimum": 0},
        },
    },
    "JobsRetried": {
        "type": "object",
        "required": ["kind", "state", "retried"],
        "properties": {
            "kind": {"type": "string"},
            "state": {"type": "string", "description": "the states retried, comma-separated"},
            "retried": {"type": "integer", "minimum": 0},
        },
    },
    "WebhookEvent": {
        "type": "object",
        "description": "the event a delivery is for, as the SSE stream sends it",
        "required": ["id", "type", "image_id", "kind", "state", "error", "at"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "type": {"type": "string", "enum": ["image.ready", "job.failed"]},
            "image_id": {"type": "string"},
            "kind": {**_NULLABLE_STRING, "description": "job.failed: the job's kind"},
            "state": _NULLABLE_STRING,
            "error": _NULLABLE_STRING,
            "at": {"type": "string", "description": "RFC 3339, UTC"},
        },
    },
    "Delivery": {
        "type": "object",
        "description": "one event to one WEBHOOK_URL; never the body sent, never the secret",
        "required": [
            "delivery_id",
            "event",
            "url",
            "state",
            "attempts",
            "next_attempt_at",
            "last_status",
            "last_error",
            "created_at",
            "delivered_at",
        ],
        "properties": {
            "delivery_id": {
                "type": "string",
                "description": "X-Imgapi-Delivery, the same on every attempt",
            },
            "event": {"$ref": "#/components/schemas/WebhookEvent"},
            "url": {"type": "string"},
            "state": {"type": "string", "enum": ["pending", "delivering", "delivered", "failed"]},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt_at": {
                "type": "string",
                "nullable": True,
                "description": "RFC 3339, UTC; null unless pending",
            },
            "last_status": {
                "type": "integer",
                "nullable": True,
                "description": "the last answer's HTTP status; null when none came",
            },
            "last_error": _NULLABLE_STRING,
            "created_at": {"type": "string", "description": "RFC 3339, UTC"},
            "delivered_at": _NULLABLE_STRING,
        },
    },
    "DeliveriesRetried": {
        "type": "object",
        "required": ["retried"],
        "properties": {"retried": {"type": "integer", "minimum": 0}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "database"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "database": {"type": "string"},
            "redis": {"type": "string"},
        },
    },
}

_NOT_FOUND = _error("no image with this id")

# The cursor pagination of the lists (images, webhook deliveries).
_PAGE_PARAMETERS = (
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "from the previous page's Link header",
    },
)


def _page(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"Link": _string_header('<url>; rel="next" when more remain')},
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}
            }
        },
    }


def _date_filter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "schema": {"type": "string", "example": "2024-05-01"},
        "description": f"{description}: a date or an RFC 3339 date-time",
    }


_WAIT = {
    "name": "wait",
    "in": "query",
    "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
    "description": "seconds to wait for every job of the image to finish before answering"
    " (data.ready says whether they did)",
}

_EVENT_STREAM = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'id: 42\nevent: image.ready\ndata: {"id":42,"type":"image.ready",'
        '"image_id":"...","kind":null,"state":"ready","error":null,"at":"..."}\n\n',
    }
}

PATHS: dict[str, Any] = {
    "/api/images": {
        "post": {
            "operationId": "upload",
            "summary": "Upload an image (JPEG, PNG, WebP, GIF, TIFF, AVIF, HEIC); failures are"
            " recorded too",
            "parameters": [_WAIT],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            },
            "responses": {
                "201": {
                    **_json(
                        "Record", "stored; thumbnails, EXIF and caption follow in the background"
                    ),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "400": _error("not a valid image, a malformed form, or a bad wait"),
                "413": _error("file or pixel count over the limit"),
                "408": _error("the body did not arrive in time (REQUEST_TIMEOUT, UPLOAD_TIMEOUT)"),
                "415": _error("file type or content type not allowed"),
                "507": _error("the server has no space left to store the upload (recorded)"),
                "503": {
                    **_error("the media storage cannot be reached (recorded); retry"),
                    "headers": {"Retry-After": _string_header("seconds")},
                },
            },
        },
        "get": {
            "operationId": "list_images",
            "summary": "Uploads, newest first; the next page is in the Link header",
            "parameters": [
                *_PAGE_PARAMETERS,
                {
                    "name": "status",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["success", "failed"]},
                },
                {
                    "name": "q",
                    "in": "query",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    "description": "words to find in the file name, the caption and the camera"
                    " (make, model, lens); each matches as a prefix, accents ignored, all must"
                    " match; ranked by relevance unless sort says otherwise",
                },
                {
                    "name": "format",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "enum": ["jpeg", "png", "webp", "gif", "tiff", "avif", "heic"],
                    },
                },
                {
                    "name": "camera",
                    "in": "query",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    "description": "the camera's make or model, whole, case-insensitive",
                },
                _date_filter("taken_after", "taken at or after (camera clock; zone ignored)"),
                _date_filter("taken_before", "taken before (camera clock; zone ignored)"),
                {
                    "name": "has_gps",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["true", "false"]},
                },
                _date_filter("uploaded_after", "uploaded at or after (UTC unless an offset)"),
                _date_filter("uploaded_before", "uploaded before (UTC unless an offset)"),
                {
                    "name": "sort",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["uploaded", "taken", "relevance"]},
                    "description": "newest first by upload (default) or by date taken (undated"
                    " last); relevance (the default with q) needs q",
                },
            ],
            "responses": {
                "200": _page("Record", "a page of records"),
                "400": _error("a bad parameter (the message names it)"),
            },
        },
    },
    "/api/images/{image_id}": {
        "parameters": [_IMAGE_ID],
        "get": {
            "operationId": "get_image",
            "summary": "One upload's record; with ?wait=, once its jobs are finished",
            "parameters": [_WAIT],
            "responses": {
                "200": _json("Record", "the record"),
                "400": _error("bad wait"),
                "404": _NOT_FOUND,
            },
        },
        "delete": {
            "operationId": "delete_image",
            "summary": "Remove an upload; thumbnails and metadata go with the last copy",
            "responses": {"204": {"description": "removed"}, "404": _NOT_FOUND},
        },
    },
    "/api/images/{image_id}/thumbnails/{size}": {
        "parameters": [
            _IMAGE_ID,
            {
                "name": "size",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["small", "medium"]},
            },
        ],
        "get": {
            "operationId": "get_thumbnail",
            "summary": "A thumbnail (small fits 256, medium fits 768), made on demand",
            "description": (
                "JPEG, WebP or AVIF (those of THUMB_FORMATS): `?format=` when given, else AVIF"
                " when Accept names image/avif, else WebP when it names image/webp, else JPEG."
            ),
            "parameters": [
                {
                    "name": "format",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["jpeg", "webp", "avif"]},
                },
                _header("Accept", "image/avif, image/webp: the preferred thumbnail format"),
            ],
            "responses": {
                "200": {
                    "description": "the thumbnail",
                    "headers": {"Vary": _string_header("Accept")},
                    "content": _THUMBNAIL_CONTENT,
                },
                "302": _S3_REDIRECT,
                "304": {"description": "not modified (If-None-Match: a matching tag, or *)"},
                "400": _error("unknown size, or a format that is not made"),
                "404": _error("unknown image, or an upload that failed"),
                "422": _error("the stored original cannot be decoded"),
            },
        },
    },
    "/api/images/{image_id}/original": {
        "parameters": [_IMAGE_ID],
        "get": {
            "operationId": "get_original",
            "summary": "The stored bytes as uploaded; one byte range, conditional requests",
            "description": (
                "ETag is the quoted sha256 of the bytes (a strong validator); Last-Modified is the"
                " upload's processed_at. Conditional requests follow RFC 9110: If-Match, else"
                " If-Unmodified-Since (412 when it fails); If-None-Match (weak comparison, `*`"
                " matches), else If-Modified-Since (304); If-Range (a strong ETag or the exact"
                " Last-Modified; otherwise the whole original, 200). One byte range answers 206;"
                " several ranges, another unit or a malformed Range answer the whole original."
            ),
            "parameters": [
                _header("Range", "one byte range: bytes=0-99, bytes=100-, bytes=-100"),
                _header("If-Range", "an ETag or the Last-Modified date; the range only if current"),
                _header("If-None-Match", 'entity tags, or "*": 304 when one matches'),
                _header("If-Modified-Since", "HTTP-date; ignored when If-None-Match is sent"),
                _header("If-Match", 'entity tags, or "*": 412 unless one matches strongly'),
                _header("If-Unmodified-Since", "HTTP-date; ignored when If-Match is sent"),
            ],
            "responses": {
                "200": {
                    "description": "the original",
                    "headers": _ORIGINAL_HEADERS,
                    "content": _ORIGINAL_CONTENT,
                },
                "302": _S3_REDIRECT,
                "206": {
                    "description": "one byte range of the original",
                    "headers": {
                        **_ORIGINAL_HEADERS,
                        "Content-Range": _string_header("bytes FIRST-LAST/SIZE"),
                    },
                    "content": _ORIGINAL_CONTENT,
                },
                "304": {
                    "description": "not modified (If-None-Match, else If-Modified-Since)",
                    "headers": {
                        "ETag": _ORIGINAL_HEADERS["ETag"],
                        "Last-Modified": _ORIGINAL_HEADERS["Last-Modified"],
                    },
                },
                "404": _error("unknown image, or an upload that failed"),
                "412": _error("If-Match or If-Unmodified-Since does not hold"),
                "416": {
                    **_error("the range starts past the end of the original"),
                    "headers": {"Content-Range": _string_header("bytes */SIZE")},
                },
            },
        },
    },
    "/api/images/{image_id}/jobs/{kind}/retry": {
        "parameters": [
            _IMAGE_ID,
            {
                "name": "kind",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["thumbnail", "exif", "caption"]},
            },
        ],
        "post": {
            "operationId": "retry_job",
            "summary": "Run a failed, skipped or unavailable job again (attempts reset, the normal"
            " path)",
            "responses": {
                "202": _json("JobRetry", "queued again"),
                "400": _error("unknown kind"),
                "404": _error("no stored image with this id"),
                "409": _error("the job is not failed, skipped or unavailable"),
            },
        },
    },
    "/api/jobs/retry": {
        "post": {
            "operationId": "retry_jobs",
            "summary": "Run every job of a kind in the given states again (default: failed and"
            " unavailable)",
            "parameters": [
                {
                    "name": "kind",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "enum": ["thumbnail", "exif", "caption"]},
                },
                {
                    "name": "state",
                    "in": "query",
                    "description": (
                        "which jobs to run again: failed, skipped or unavailable, or several of"
                        " them comma-separated (e.g. failed,unavailable); the answer's state lists"
                        " them in the order given, without repeats"
                    ),
                    "schema": {
                        "type": "string",
                        "pattern": "^(failed|skipped|unavailable)(,(failed|skipped|unavailable))*$",
                        "default": "failed,unavailable",
                    },
                },
            ],
            "responses": {
                "200": _json("JobsRetried", "how many were queued again"),
                "400": _error("unknown kind or state"),
            },
        },
    },
    "/api/events": {
        "get": {
            "operationId": "events",
            "summary": "Live events as Server-Sent Events: image.uploaded, job.started,"
            " job.queued, job.done, job.failed, image.ready, image.deleted",
            "description": (
                "Each event has an `id:` line; a client that reconnects with Last-Event-ID (or"
                " ?after=) gets what it missed first (events are kept EVENTS_KEEP_SECONDS)."
                " A comment line every EVENTS_HEARTBEAT_SECONDS keeps an idle stream open."
            ),
            "parameters": [
                _header("Last-Event-ID", "the id of the last event received: resume after it"),
                {
                    "name": "after",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "as Last-Event-ID, for clients that cannot send headers",
                },
            ],
            "responses": {
                "200": {"description": "the stream (it does not end)", "content": _EVENT_STREAM},
                "400": _error("Last-Event-ID or after is not an event id"),
            },
        },
    },
    "/api/webhooks/deliveries": {
        "get": {
            "operationId": "list_deliveries",
            "summary": "Webhook deliveries, newest first; the next page is in the Link header",
            "parameters": [
                {
                    "name": "state",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "enum": ["pending", "delivering", "delivered", "failed"],
                    },
                },
                *_PAGE_PARAMETERS,
            ],
            "responses": {
                "200": _page("Delivery", "a page of deliveries"),
                "400": _error("bad state, limit or cursor"),
            },
        },
    },
    "/api/webhooks/deliveries/retry": {
        "post": {
            "operationId": "retry_deliveries",
            "summary": "Send every failed webhook delivery again, attempts reset",
            "responses": {"200": _json("DeliveriesRetried", "how many are pending again")},
        },
    },
    "/api/stats": {
        "get": {
            "operationId": "stats",
            "summary": "Upload and job counts, success rate, average processing time",
            "responses": {"200": _json("Stats", "the summary")},
        },
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Database and (when configured) Redis reachability",
            "responses": {
                "200": _json("Health", "healthy"),
                "503": _json("Health", "a dependency is unreachable"),
            },
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics of every server process and of the jobs table",
            "description": "The Prometheus text format (README: Operations). With"
            " METRICS_PUBLIC=1 no key is needed.",
            "responses": {
                "200": {
                    "description": "the exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            },
        },
    },
}


# Who may call each operation in keys mode (AUTH=keys): the scope its route declares
# (imgapi_core.access.scopes; a test holds the two together), or None for public.
ACCESS: dict[str, str | None] = {
    "upload": "upload",
    "list_images": "read",
    "get_image": "read",
    "delete_image": "delete",
    "get_thumbnail": "read",
    "get_original": "read",
    "stats": "read",
    "healthz": None,
    "retry_job": "admin",
    "retry_jobs": "admin",
    "events": "read",
    "list_deliveries": "admin",
    "retry_deliveries": "admin",
    "metrics": "admin",
}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: `python imgapi.py keys create NAME --scopes ...`",
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "deleteToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Delete-Token",
        "description": "the delete_token of the upload's 201 answer: deletes that upload only",
    },
    "signedUrl": {
        "type": "apiKey",
        "in": "query",
        "name": "sig",
        "description": "with exp: the signed URLs in records (thumbnails, original)",
    },
}


def _with_access(paths: dict[str, Any]) -> dict[str, Any]:
    """Per-operation security and the answers of the access rules (401, 403, 429)."""
    out: dict[str, Any] = {}
    for path, item in paths.items():
        out[path] = {}
        for method, op in item.items():
            if method == "parameters":
                out[path][method] = op
                continue
            scope = ACCESS[op["operationId"]]
            if scope is None:
                out[path][method] = {**op, "security": []}
                continue
            security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
            if scope == "delete":
                security.append({"deleteToken": []})
            if op["operationId"] in ("get_thumbnail", "get_original"):
                security.append({"signedUrl": []})
            responses = {
                **op["responses"],
                "401": _error("no API key, or an unknown or revoked one (keys mode)"),
                "403": _error(f"the key lacks the {scope!r} scope, or a bad signed URL or token"),
            }
            # Any operation that reads or writes the database or the object store.
            responses.setdefault(
                "503",
                {
                    **_error("the database or the media storage cannot be reached; retry"),
                    "headers": {"Retry-After": _string_header("seconds")},
                },
            )
            if scope == "upload":
                responses["429"] = {
                    **_error("over UPLOAD_RATE_LIMIT; nothing recorded"),
                    "headers": {"Retry-After": _string_header("seconds")},
                }
            description = op.get("description", "")
            note = f"Keys mode: needs the `{scope}` scope (or `admin`)."
            out[path][method] = {
                **op,
                "security": security,
                "responses": responses,
                "description": f"{description}\n\n{note}".strip(),
            }
    return out


def _inline_path_parameters(paths: dict[str, Any]) -> dict[str, Any]:
    """sanic-ext takes operations only: path-level parameters are copied into each operation."""
    out: dict[str, Any] = {}
    for path, item in paths.items():
        shared = item.get("parameters", [])
        out[path] = {
            method: {**op, "parameters": [*shared, *op.get("parameters", [])]}
            for method, op in item.items()
            if method != "parameters"
        }
    return out


SPEC: dict[str, Any] = {
    "info": {
        "title": "imgapi",
        "version": "0.1.0",
        "description": "Image upload and processing: thumbnails, EXIF and captions.",
    },
    "paths": _inline_path_parameters(_with_access(PATHS)),
    "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
}
