"""The app's stored media looked at directly by a test, whichever engine its settings name: files
under MEDIA_DIR, or objects in the bucket of STORAGE_URL (through a plain boto3 client, not the
app's own S3 code). Keys are the storage keys the database holds: `originals/{id}.jpg`,
`thumbnails/small/{sha256}.jpeg`.

Calls block: they are quick, and the servers they talk to (the file system, moto's process) are
not the test's event loop."""

from __future__ import annotations

import functools
import urllib.parse
from pathlib import Path
from typing import Any

from imgapi_core.settings import Settings


def keys(cfg: Settings, prefix: str = "") -> list[str]:
    """Every stored key that starts with `prefix` ("originals/", "thumbnails/small/"), sorted;
    the upload temp folder is not storage and is left out (see leftovers)."""
    if not cfg.storage_url:
        root = Path(cfg.media_dir)
        if not root.is_dir():
            return []
        found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix) and not k.startswith("tmp/"))
    client, bucket, base = _bucket(cfg)
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=base + prefix
    ):
        found += [item["Key"][len(base) :] for item in page.get("Contents", ())]
    return sorted(found)


def read(cfg: Settings, key: str) -> bytes | None:
    """The stored bytes, or None where nothing is stored under the key."""
    if not cfg.storage_url:
        path = Path(cfg.media_dir) / key
        return path.read_bytes() if path.is_file() else None
    client, bucket, base = _bucket(cfg)
    try:
        return client.get_object(Bucket=bucket, Key=base + key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def exists(cfg: Settings, key: str) -> bool:
    return read(cfg, key) is not None


def write(cfg: Settings, key: str, data: bytes) -> None:
    """Replaces what is stored under the key behind the app's back (a damaged original)."""
    if not cfg.storage_url:
        path = Path(cfg.media_dir) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    client, bucket, base = _bucket(cfg)
    client.put_object(Bucket=bucket, Key=base + key, Body=data)


def remove(cfg: Settings, key: str) -> None:
    """Deletes what is stored under the key behind the app's back (a lost file, a lost object)."""
    if not cfg.storage_url:
        (Path(cfg.media_dir) / key).unlink()
        return
    client, bucket, base = _bucket(cfg)
    client.delete_object(Bucket=bucket, Key=base + key)


def leftovers(cfg: Settings) -> list[str]:
    """What an upload may leave behind outside storage proper: temp files of the upload folder,
    and (on S3) multipart uploads begun and never completed or aborted."""
    tmp = cfg.tmp_dir
    found = sorted(f"tmp/{p.name}" for p in tmp.iterdir()) if tmp.is_dir() else []
    if cfg.storage_url:
        client, bucket, base = _bucket(cfg)
        listing = client.list_multipart_uploads(Bucket=bucket, Prefix=base)
        found += sorted(
            f"multipart:{item['Key'][len(base) :]}" for item in listing.get("Uploads", ())
        )
    return found


def _bucket(cfg: Settings) -> tuple[Any, str, str]:
    parts = urllib.parse.urlsplit(cfg.storage_url)
    prefix = parts.path.strip("/")
    client = _client(
        cfg.s3_endpoint_url, cfg.aws_access_key_id, cfg.aws_secret_access_key, cfg.aws_region
    )
    return client, parts.netloc, f"{prefix}/" if prefix else ""


@functools.cache
def _client(endpoint_url: str, key_id: str, secret: str, region: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        region_name=region,
    )
