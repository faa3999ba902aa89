"""Search and filters as every Store implementation must answer them, written only against the
Store protocol: the full-text index follows uploads, EXIF, captions and deletes in their own
transactions; words match as prefixes without accents; each filter and each order; pages that
follow each other without gaps or repeats."""

from __future__ import annotations

import json

import pytest
from store_helpers import add_image

from imgapi_core.store import ImageQuery, Store, now_iso


def sha_of(i: int) -> str:
    return f"{i:064x}"


PHOTOS = [
    # image_id, caption, make, model, taken, gps
    ("p0", "a sunset over the beach", "Canon", "Canon EOS 5D", "2019:05:10 18:03:22", True),
    ("p1", "a dog running on the sand", "NIKON CORPORATION", "COOLPIX P6000", None, False),
    ("p2", "sunny day in the park", "Apple", "iPhone 12", "2021:07:01 09:00:00", True),
    ("p3", "beach volleyball players", "Canon", "Canon EOS R5", "2020:01:01 00:00:00", False),
    ("p4", "un café au lait sur la table", "FUJIFILM", "X100F", "2018:12:31 23:59:59", False),
]


async def add_photos(store: Store) -> None:
    for i, (image_id, caption, make, model, taken, gps) in enumerate(PHOTOS):
        await add_image(store, image_id, sha_of(i), processed_at=f"2026-03-01T10:00:0{i}.000Z")
        exif: dict[str, object] = {"Make": make, "Model": model}
        if taken:
            exif["DateTimeOriginal"] = taken
        if gps:
            exif.update(latitude=43.4, longitude=-1.5)
        await store.set_exif(sha_of(i), json.dumps(exif))
        await store.set_caption(sha_of(i), caption)


async def ids(store: Store, **query: object) -> list[str]:
    records, _, _ = await store.search_with_jobs(ImageQuery(**query), limit=100)
    return [r.image_id for r in records]


@pytest.fixture
async def photos(store: Store) -> Store:
    await add_photos(store)
    return store


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("sun",), {"p0", "p2"}),  # a prefix: sunset, sunny
        (("beach",), {"p0", "p3"}),
        (("sun", "beach"), {"p0"}),  # every word must match
        (("cafe",), {"p4"}),  # accents ignored
        (("CAFÉ",), {"p4"}),
        (("eos",), {"p0", "p3"}),  # the camera model
        (("coolpix",), {"p1"}),
        (("p2",), {"p2"}),  # the file name, p2.jpg
        (("zebra",), set()),
        (('"',), set()),  # quotes and FTS syntax are plain text
        (("NEAR", "OR"), set()),
    ],
)
async def test_words_find_name_caption_and_camera(
    photos: Store, words: tuple[str, ...], expected: set[str]
) -> None:
    for sort in ("relevance", "uploaded", "taken"):
        assert set(await ids(photos, words=words, sort=sort)) == expected, sort


async def test_relevance_ranks_the_better_match_first(photos: Store) -> None:
    await add_image(photos, "p5", sha_of(5))
    await photos.set_caption(sha_of(5), "beach beach beach at the beach")
    assert (await ids(photos, words=("beach",), sort="relevance"))[0] == "p5"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"camera": "canon"}, ["p3", "p0"]),  # the make, any case
        ({"camera": "iphone 12"}, ["p2"]),  # or the model
        ({"camera": "iphone"}, []),  # whole, not a part
        ({"taken_after": "2020-01-01T00:00:00"}, ["p3", "p2"]),  # inclusive
        ({"taken_before": "2020-01-01T00:00:00"}, ["p4", "p0"]),  # exclusive
        ({"has_gps": True}, ["p2", "p0"]),
        ({"has_gps": False}, ["p4", "p3", "p1"]),
        ({"format": "jpeg"}, ["p4", "p3", "p2", "p1", "p0"]),
        ({"format": "png"}, []),
        ({"uploaded_after": "2026-03-01T10:00:03.000Z"}, ["p4", "p3"]),
        ({"uploaded_before": "2026-03-01T10:00:01.000Z"}, ["p0"]),
        ({"camera": "Canon", "has_gps": True, "words": ("sun",)}, ["p0"]),
        ({"sort": "taken"}, ["p2", "p3", "p0", "p4", "p1"]),  # undated last
        ({"sort": "taken", "camera": "canon"}, ["p3", "p0"]),
    ],
)
async def test_filters_combine_and_sort(
    photos: Store, query: dict[str, object], expected: list[str]
) -> None:
    assert await ids(photos, **query) == expected


async def test_failed_uploads_are_listed_by_status_and_found_by_name(photos: Store) -> None:
    stamp = now_iso()
    await photos.record_failure(
        image_id="bad",
        original_name="quarterly-report.xlsx",
        processed_at=stamp,
        start_time=stamp,
        error="file type .xlsx is not allowed",
    )
    assert await ids(photos, status="failed") == ["bad"]
    assert await ids(photos, words=("quarterly",)) == ["bad"]
    assert "bad" not in await ids(photos, status="success")


async def test_the_index_follows_deletes_and_late_captions(photos: Store) -> None:
    assert await photos.delete_image("p0") is not None
    assert await ids(photos, words=("sunset",)) == []
    await photos.set_caption(sha_of(1), "a cat asleep")
    assert await ids(photos, words=("dog",)) == []
    assert await ids(photos, words=("cat",)) == ["p1"]
    # A second upload of the same bytes: found by the caption of the bytes, and by its own name.
    await add_image(photos, "again", sha_of(1))
    assert set(await ids(photos, words=("cat",))) == {"p1", "again"}
    assert await ids(photos, words=("again",)) == ["again"]


@pytest.mark.parametrize(
    "query",
    [
        {"sort": "uploaded"},
        {"sort": "taken"},
        {"sort": "relevance", "words": ("a",)},
        {"sort": "uploaded", "camera": "canon"},
    ],
)
async def test_pages_follow_each_other_without_gaps_or_repeats(
    photos: Store, query: dict[str, object]
) -> None:
    for i in range(6, 16):  # more, some with equal keys (same caption, same date)
        await add_image(photos, f"x{i}", sha_of(i), processed_at="2026-03-01T11:00:00.000Z")
        await photos.set_caption(sha_of(i), "a plain caption")
        await photos.set_exif(sha_of(i), json.dumps({"Make": "Canon"}))
    everything = await ids(photos, **query)
    seen: list[str] = []
    after = None
    while True:
        records, _, keys = await photos.search_with_jobs(ImageQuery(**query), limit=3, after=after)
        seen += [r.image_id for r in records]
        if len(records) < 3:
            break
        after = keys[-1]
    assert seen == everything and len(set(seen)) == len(seen)


async def test_taken_at_comes_with_the_record(photos: Store) -> None:
    records, _, _ = await photos.search_with_jobs(ImageQuery(camera="x100f"), limit=10)
    assert [r.taken_at for r in records] == ["2018-12-31T23:59:59"]
    record = await photos.get_record("p1")
    assert record is not None and record.taken_at is None


async def test_job_counts_by_kind_and_state(store: Store) -> None:
    await add_image(store, "a", sha_of(1))
    await add_image(store, "b", sha_of(2), jobs={"thumbnail": ("queued", None)})
    assert await store.claim_job(sha_of(1), "exif", "r", 30) is not None
    assert await store.finish_job(sha_of(1), "exif", "r", "failed", "broken")
    assert await store.job_counts() == {
        ("thumbnail", "queued"): 2,
        ("exif", "failed"): 1,
        ("caption", "queued"): 1,
    }
