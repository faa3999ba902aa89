"""Search speed: `GET /api/images?limit=100` with q=, camera=, taken_after= and has_gps= on a
database of 100,000 photos, and what keeping the search index costs the writes of each upload.

Run: flock /tmp/imgapi-bench.lock python bench/bench_search.py [--records 100000]
         [--requests 200] [--keep DIR] [--json-out FILE]
(~3-5 minutes on 2 busy cores; --keep DIR builds the database there once and reuses it.)

1. Build: the app's own migrations make the schema (SqliteStore.open), then plain sqlite3 bulk
   inserts (executemany, large transactions) fill metadata, image_shape, images, stats and jobs
   (3 per image, done). Each metadata row then gets `UPDATE metadata SET exif_json = ?, caption =
   ?`, so the migration-10 triggers fill photo_facts and image_text exactly as the EXIF and
   caption jobs do in production; that pass is timed. Captions are BLIP-style sentences drawn
   from a vocabulary of ~300 words with Zipf-like weights (common words common); the EXIF is what
   the EXIF job stores (Pillow tag names, GPSInfo plus latitude/longitude) for ~30 real
   make/model/lens triples, DateTimeOriginal spread over 10 years, ~40% with GPS, ~8% with no
   EXIF at all (screenshots, messenger copies). ~2% are repeat uploads of earlier bytes.
2. Queries: `python imgapi.py` on that database; one keep-alive client sends --requests
   sequential requests per query after --warmup (fewer when --query-seconds run out first),
   each request taking the next of a few variants (other words, makes, dates) so no single
   cached plan or page is timed. Reported per query:
   p50/p95/p99/max over HTTP, the p50 of its SQL alone (the server's exact statement, run
   in-process on a plain connection), how many rows match, and the EXPLAIN QUERY PLAN.
3. Index cost, writes (--write-uploads record_success + set_exif + set_caption calls through
   SqliteStore: what an upload and its EXIF and caption jobs write) on two databases at the
   current schema, one with the four index triggers dropped, in interleaved rounds; once on
   fresh databases and once on copies of the queries' database. The ratio is the index's share
   of the write path alone.
4. Index cost, HTTP uploads (--http-uploads, small real camera JPEGs, byte-unique): two
   `python imgapi.py` side by side, triggers and none, interleaved rounds timed until their
   jobs finished; uploads/s and server CPU per upload. bench_uploads.py cannot be pointed at a
   database (it makes its own), hence this small version of it.

--parts picks any of queries, writes, http (default all).
Prints JSON, then tables and the query plans.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import http.client
import itertools
import json
import math
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import procs  # noqa: E402  (tests/procs.py: real API processes)
from store_helpers import list_request  # noqa: E402  (tests/store_helpers.py)

from imgapi_core.store import JOB_KINDS, NewUpload  # noqa: E402
from imgapi_core.store import sqlite as store_sqlite  # noqa: E402
from imgapi_core.store.sqlite import SqliteStore  # noqa: E402

GOAL_P50_MS = 20.0
GOAL_P99_MS = 60.0
GOAL_WRITE_COST = 0.05  # the index may cost at most 5% of upload throughput
PAGE = 100
PARTS = ("queries", "writes", "http")
# Bumped whenever the generated data changes, so that --keep rebuilds an older database.
SEED_VERSION = 1
INDEX_TRIGGERS = (
    "images_text_insert",
    "images_text_delete",
    "metadata_facts",
    "metadata_caption_text",
)
# Small real camera JPEGs with EXIF (GPS on the first) for the HTTP upload comparison.
HTTP_PHOTOS = ("nikon-p6000-gps.jpg", "fujifilm-x100f-seed.jpg")
GPS_SHARE = 0.40
NO_EXIF_SHARE = 0.08
REPEAT_SHARE = 0.02
# The cameras' clocks: 10 years of photos up to this day (fixed, so a kept database and a new
# one agree on which dates the taken_after queries ask for).
TAKEN_END = datetime(2025, 12, 31, 23, 59, 59)
TAKEN_SPAN = timedelta(days=3652)
# Rows per transaction of the EXIF/caption pass. Small enough that the FTS index is written as
# many segments and merged the way one-upload-at-a-time writes leave it (one huge transaction
# would leave a single, unrealistically compact segment), large enough to keep the build quick.
FILL_BATCH = 1000

T = TypeVar("T")


# -- vocabulary ----------------------------------------------------------------------------------
# Each list is ordered from common to rare: a Zipf-like weight (1 / rank) makes "man", "beach"
# and "dog" frequent and "glacier" or "violin" rare, as in real caption output.

SUBJECTS = (
    "man", "woman", "person", "group of people", "dog", "cat", "young boy", "little girl",
    "couple", "bird", "horse", "child", "baby", "family", "crowd of people", "cow", "sheep",
    "surfer", "skier", "elephant", "bear", "skateboarder", "duck", "seagull", "giraffe",
    "zebra", "deer", "goat", "teddy bear", "squirrel", "monkey", "police officer", "chef",
    "bride and groom", "tourist", "musician", "swan", "lion", "rabbit", "butterfly", "pigeon",
    "fisherman", "soldier", "cyclist", "puppy", "kitten", "owl", "camel", "penguin", "dolphin",
)  # fmt: skip
POSES = (
    "standing", "sitting", "walking", "laying", "posing", "waiting", "playing", "running",
    "jumping", "swimming", "sleeping", "smiling", "dancing", "resting", "hiking", "climbing",
    "kneeling", "relaxing", "reading", "fishing",
)  # fmt: skip
ACTIONS = (
    "riding", "holding", "looking at", "playing with", "eating", "carrying", "walking with",
    "standing next to", "pushing", "throwing", "catching", "flying", "taking a picture of",
    "drinking", "talking on", "petting", "feeding", "wearing", "pulling", "painting",
)  # fmt: skip
OBJECTS = (
    "surfboard", "bike", "umbrella", "frisbee", "kite", "skateboard", "phone", "camera",
    "book", "cup of coffee", "pizza", "horse", "ball", "bag", "hat", "guitar", "tennis racket",
    "banana", "sandwich", "laptop", "suitcase", "dog", "cake", "bottle of wine", "motorcycle",
    "boat", "flower", "sign", "ice cream cone", "baseball bat", "balloon", "backpack",
    "newspaper", "map", "snowboard", "fishing rod", "kayak", "violin", "lantern", "tractor",
)  # fmt: skip
PREPOSITIONS = (
    "on", "in", "next to", "in front of", "near", "on top of", "under", "by", "at",
    "in the middle of", "along", "behind", "inside",
)  # fmt: skip
PLACES = (
    "beach", "street", "field", "park", "table", "couch", "bed", "grass", "water", "city",
    "road", "snow", "sidewalk", "kitchen", "room", "building", "tree", "wave", "forest",
    "mountain", "lake", "river", "bench", "window", "garden", "desert", "bridge", "harbor",
    "market", "station", "airport", "church", "castle", "stadium", "playground", "restaurant",
    "hill", "fence", "boat", "pier", "pool", "sand", "rock", "cliff", "lighthouse", "waterfall",
    "temple", "museum", "parking lot", "train", "bus", "farm", "vineyard", "island", "canyon",
    "glacier", "volcano", "meadow", "village", "alley", "rooftop", "balcony", "porch",
    "fireplace", "stage", "ski slope", "tennis court", "soccer field", "dock", "sunflower field",
)  # fmt: skip
ADJECTIVES = (
    "", "young", "old", "small", "large", "little", "white", "black", "brown", "red", "blue",
    "happy", "wet", "tall", "cute", "fluffy", "sleepy", "sunburned", "muddy", "tiny",
)  # fmt: skip
SCENES = (
    "kitchen", "living room", "bedroom", "bathroom", "city street", "beach", "harbor",
    "market", "office", "restaurant", "garden", "park", "classroom", "library", "train station",
)  # fmt: skip
THINGS = (
    "table", "chairs", "stove", "refrigerator", "window", "bed", "lamp", "couch", "tv", "sink",
    "mirror", "plants", "boats", "umbrellas", "cars", "people", "trees", "benches",
    "bookshelves", "stalls",
)  # fmt: skip
VIEW_OF = (
    "city", "beach", "mountain", "lake", "river", "harbor", "bridge", "field", "forest",
    "castle", "village", "desert", "canyon", "waterfall", "glacier", "skyline",
)  # fmt: skip
VIEW_WHEN = (
    "", "at night", "at sunset", "from a hill", "from above", "in the fog", "in the rain",
    "on a sunny day", "in winter", "at sunrise", "from a boat", "from an airplane window",
)  # fmt: skip
CLOSE_UPS = (
    "plate of food", "pizza", "sandwich", "bowl of soup", "cake", "salad", "cup of coffee",
    "donut", "burger", "bowl of fruit", "flower", "cat", "butterfly", "leaf", "sushi",
    "pasta", "steak", "pancakes", "ice cream", "croissant", "watch", "bee",
)  # fmt: skip
COLORS = ("white", "black", "red", "blue", "silver", "yellow", "green", "old", "vintage")
VEHICLES = (
    "car", "truck", "bus", "motorcycle", "bicycle", "van", "train", "boat", "scooter",
    "tractor", "taxi", "camper van",
)  # fmt: skip
SKIES = (
    "a sunset over the ocean", "a sunset over a lake", "the sun setting over the mountains",
    "a rainbow over a field", "a full moon in the night sky", "fireworks over a city",
    "clouds over a mountain", "a sunny day at the beach", "the northern lights over a lake",
    "a starry sky over a desert",
)  # fmt: skip
EVENTS = (
    "Holiday", "Vacation", "Trip", "Birthday", "Wedding", "Christmas", "Summer", "Weekend",
    "Grandma", "Party", "Hike", "Roadtrip",
)  # fmt: skip


@dataclass(frozen=True)
class Camera:
    make: str  # EXIF Make and Model as cameras write them (NIKON CORPORATION, samsung ...)
    model: str
    lens: str | None  # EXIF LensModel; fixed-lens cameras and most phones write none
    width: int
    height: int
    names: str  # the camera's file-name pattern (see file_name)


# Ordered from common to rare (phones first, as in any photo library today).
CAMERAS = (
    Camera("Apple", "iPhone 12", "iPhone 12 back dual wide camera 4.2mm f/1.6", 4032, 3024, "img"),
    Camera("Apple", "iPhone 11", "iPhone 11 back dual wide camera 4.25mm f/1.8", 4032, 3024, "img"),
    Camera("samsung", "SM-G991B", None, 4000, 3000, "stamp"),
    Camera("Google", "Pixel 6", None, 4080, 3072, "pxl"),
    Camera("Apple", "iPhone XR", "iPhone XR back camera 4.25mm f/1.8", 4032, 3024, "img"),
    Camera("Canon", "Canon EOS 5D Mark IV", "EF24-105mm f/4L IS II USM", 6720, 4480, "img"),
    Camera("NIKON CORPORATION", "NIKON D750", "24.0-120.0 mm f/4.0", 6016, 4016, "nikon"),
    Camera("SONY", "ILCE-7M3", "FE 24-105mm F4 G OSS", 6000, 4000, "sony"),
    Camera("Apple", "iPhone 13 Pro", "iPhone 13 Pro back triple camera 5.7mm f/1.5", 4032, 3024,
           "img"),
    Camera("samsung", "SM-G930V", None, 4032, 3024, "stamp"),
    Camera("FUJIFILM", "X100F", None, 6000, 4000, "fuji"),
    Camera("Canon", "Canon EOS 80D", "EF-S18-135mm f/3.5-5.6 IS USM", 6000, 4000, "img"),
    Camera("Xiaomi", "Mi 9T", None, 4000, 3000, "img_stamp"),
    Camera("Google", "Pixel 4a", None, 4032, 3024, "pxl"),
    Camera("HUAWEI", "ELE-L29", None, 3648, 2736, "img_stamp"),
    Camera("SONY", "ILCE-6000", "E PZ 16-50mm F3.5-5.6 OSS", 6000, 4000, "sony"),
    Camera("NIKON CORPORATION", "NIKON D3500", "18.0-55.0 mm f/3.5-5.6", 6000, 4000, "nikon"),
    Camera("Canon", "Canon EOS R6", "RF24-105mm F4 L IS USM", 5472, 3648, "img"),
    Camera("FUJIFILM", "X-T3", "XF18-55mmF2.8-4 R LM OIS", 6240, 4160, "fuji"),
    Camera("OnePlus", "ONEPLUS A6003", None, 4608, 3456, "img_stamp"),
    Camera("NIKON CORPORATION", "NIKON Z 6", "NIKKOR Z 24-70mm f/4 S", 6048, 4024, "nikon"),
    Camera("OLYMPUS CORPORATION", "E-M10MarkII", "OLYMPUS M.14-42mm F3.5-5.6 EZ", 4608, 3456,
           "p"),
    Camera("Panasonic", "DMC-GH4", "LUMIX G VARIO 12-35/F2.8", 4608, 3456, "p"),
    Camera("SONY", "DSC-RX100M5", None, 5472, 3648, "sony"),
    Camera("Apple", "iPhone 8", "iPhone 8 back camera 3.99mm f/1.8", 4032, 3024, "img"),
    Camera("GoPro", "HERO7 Black", None, 4000, 3000, "gopro"),
    Camera("DJI", "FC7203", None, 4000, 3000, "dji"),
    Camera("RICOH IMAGING COMPANY, LTD.", "RICOH GR III", None, 6000, 4000, "ricoh"),
    Camera("Canon", "Canon EOS 6D", "EF50mm f/1.8 STM", 5472, 3648, "img"),
    Camera("LEICA CAMERA AG", "LEICA Q2", "SUMMILUX 1:1.7/28 ASPH.", 8368, 5584, "leica"),
)  # fmt: skip

# What the timed requests vary over, per query (each request takes the next variant).
ONE_WORD_COMMON = ("beach", "dog", "street", "table", "water")
ONE_WORD_RARE = ("lighthouse", "giraffe", "violin", "glacier", "kayak")
TWO_WORDS = ("man beach", "dog grass", "woman umbrella", "city night", "plate food")
PREFIXES = ("sun", "bea", "mou", "sno", "bir")
MAKES = ("Apple", "Canon", "NIKON CORPORATION", "SONY", "samsung")
MODELS = ("iPhone 12", "NIKON D750", "ILCE-7M3", "X100F", "Pixel 6")
TAKEN_AFTER_DAYS = (365, 330, 400, 300, 430)  # before the newest photo


class Zipf(Generic[T]):
    """Picks from `items` with weight 1/rank**s: a few items common, a long rare tail."""

    def __init__(self, items: Sequence[T], s: float = 1.0) -> None:
        self.items = list(items)
        self.cum = list(itertools.accumulate(1 / (rank + 1) ** s for rank in range(len(items))))

    def __call__(self, rng: random.Random) -> T:
        # bisect over the cumulative weights: rng.choices does the same with more overhead.
        return self.items[bisect.bisect(self.cum, rng.random() * self.cum[-1])]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


class Captions:
    """BLIP-style sentences ("a man riding a surfboard on a wave", "a dog sitting on a couch")."""

    def __init__(self) -> None:
        self.subject = Zipf(SUBJECTS)
        self.pose = Zipf(POSES)
        self.action = Zipf(ACTIONS)
        self.obj = Zipf(OBJECTS)
        self.prep = Zipf(PREPOSITIONS)
        self.place = Zipf(PLACES)
        self.adjective = Zipf(ADJECTIVES, 0.6)  # "" (no adjective) is the most common
        self.scene = Zipf(SCENES)
        self.thing = Zipf(THINGS)
        self.view_of = Zipf(VIEW_OF)
        self.view_when = Zipf(VIEW_WHEN, 0.7)
        self.close_up = Zipf(CLOSE_UPS)
        self.color = Zipf(COLORS)
        self.vehicle = Zipf(VEHICLES)
        self.sky = Zipf(SKIES)
        templates: list[tuple[float, Callable[[random.Random], str]]] = [
            (0.25, self._pose),
            (0.25, self._action_at),
            (0.12, self._action),
            (0.10, self._view),
            (0.08, self._scene),
            (0.06, self._vehicle),
            (0.06, self._there_is),
            (0.04, self._close_up),
            (0.04, lambda rng: self.sky(rng)),
        ]
        self.templates = [t for _, t in templates]
        self.cum = list(itertools.accumulate(w for w, _ in templates))

    def __call__(self, rng: random.Random) -> str:
        pick = self.templates[bisect.bisect(self.cum, rng.random() * self.cum[-1])]
        return " ".join(pick(rng).split())  # an empty adjective leaves a double space

    def _who(self, rng: random.Random) -> str:
        return article(f"{self.adjective(rng)} {self.subject(rng)}".strip())

    def _pose(self, rng: random.Random) -> str:
        return f"{self._who(rng)} {self.pose(rng)} {self.prep(rng)} {article(self.place(rng))}"

    def _action_at(self, rng: random.Random) -> str:
        what = article(self.obj(rng))
        return f"{self._who(rng)} {self.action(rng)} {what} {self.prep(rng)} the {self.place(rng)}"

    def _action(self, rng: random.Random) -> str:
        return f"{self._who(rng)} {self.action(rng)} {article(self.obj(rng))}"

    def _view(self, rng: random.Random) -> str:
        return f"a view of {article(self.view_of(rng))} {self.view_when(rng)}"

    def _scene(self, rng: random.Random) -> str:
        return f"{article(self.scene(rng))} with {article(self.thing(rng))} and {self.thing(rng)}"

    def _vehicle(self, rng: random.Random) -> str:
        car = article(f"{self.color(rng)} {self.vehicle(rng)}")
        return f"{car} parked {self.prep(rng)} {article(self.place(rng))}"

    def _there_is(self, rng: random.Random) -> str:
        who = article(self.subject(rng))
        return f"there is {who} that is {self.pose(rng)} {self.prep(rng)} the {self.place(rng)}"

    def _close_up(self, rng: random.Random) -> str:
        return f"a close up of {article(self.close_up(rng))}"


def exif_date(moment: datetime) -> str:
    return moment.strftime("%Y:%m:%d %H:%M:%S")


def photo_exif(
    rng: random.Random, camera: Camera, taken: datetime, gps: bool, orientation: int
) -> dict[str, Any]:
    """The EXIF dict the EXIF job stores for a photo of this camera (imaging.extract_exif's keys:
    IFD0 and Exif tags flat by Pillow's names, GPSInfo nested, latitude/longitude added)."""
    stamp = exif_date(taken)
    exposure = rng.choice((1 / 4000, 1 / 1000, 1 / 500, 1 / 250, 1 / 125, 1 / 60, 1 / 30, 0.5))
    exif: dict[str, Any] = {
        "Make": camera.make,
        "Model": camera.model,
        "Orientation": orientation,
        "DateTime": stamp,
        "DateTimeOriginal": stamp,
        "DateTimeDigitized": stamp,
        "SubsecTimeOriginal": f"{rng.randint(0, 999):03d}",
        "ExifImageWidth": camera.width,
        "ExifImageHeight": camera.height,
        "ImageWidth": camera.width,
        "ImageLength": camera.height,
        "ISOSpeedRatings": rng.choice((50, 100, 125, 200, 400, 800, 1600, 3200, 6400)),
        "FNumber": rng.choice((1.6, 1.8, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0)),
        "ExposureTime": exposure,
        "ShutterSpeedValue": round(-math.log2(exposure), 3),
        "FocalLength": round(rng.uniform(4.2, 105.0), 2),
        "FocalLengthIn35mmFilm": rng.choice((24, 26, 28, 35, 50, 70, 85, 105)),
        "ExposureProgram": 2,
        "ExposureBiasValue": 0.0,
        "MeteringMode": rng.choice((2, 5)),
        "Flash": rng.choice((0, 16, 24)),
        "WhiteBalance": 0,
        "ColorSpace": 1,
        "SceneCaptureType": 0,
        "ResolutionUnit": 2,
        "XResolution": 72.0,
        "YResolution": 72.0,
        "YCbCrPositioning": 1,
        "ExifVersion": "30323331",
        "FlashPixVersion": "30313030",
        "ComponentsConfiguration": "01020300",
        "Software": rng.choice(("15.4.1", "1.10", "Ver.1.02", "G991BXXU5CVF1", "Adobe Lightroom")),
    }
    if camera.lens is not None:
        exif["LensModel"] = camera.lens
        exif["LensMake"] = camera.make
    if gps:
        lat = round(rng.uniform(-55.0, 70.0), 7)
        lon = round(rng.uniform(-180.0, 180.0), 7)
        exif["GPSInfo"] = {
            "GPSVersionID": "02020000",
            "GPSLatitudeRef": "N" if lat >= 0 else "S",
            "GPSLatitude": _dms(abs(lat)),
            "GPSLongitudeRef": "E" if lon >= 0 else "W",
            "GPSLongitude": _dms(abs(lon)),
            "GPSAltitudeRef": "00",
            "GPSAltitude": round(rng.uniform(0, 2500), 1),
            "GPSTimeStamp": [float(taken.hour), float(taken.minute), float(taken.second)],
            "GPSDateStamp": taken.strftime("%Y:%m:%d"),
        }
        exif["latitude"] = lat
        exif["longitude"] = lon
    return exif


def _dms(degrees: float) -> list[float]:
    whole = int(degrees)
    minutes = (degrees - whole) * 60
    return [float(whole), float(int(minutes)), round((minutes - int(minutes)) * 60, 4)]


def file_name(rng: random.Random, camera: Camera, taken: datetime, caption_place: str) -> str:
    """What the camera named the file, or (15%) a name a person gave it."""
    n = rng.randint(1, 9999)
    if rng.random() < 0.15:
        year = taken.year
        return rng.choice(
            (
                f"{rng.choice(EVENTS)} {caption_place} {year}.jpg",
                f"{rng.choice(EVENTS).lower()}-{n:04d}.jpg",
                f"{rng.choice(EVENTS)} {year} ({rng.randint(1, 40)}).jpg",
                "photo.jpg",
                f"image ({rng.randint(1, 30)}).jpeg",
            )
        )
    stamp = taken.strftime("%Y%m%d_%H%M%S")
    return {
        "img": f"IMG_{n:04d}.JPG",
        "stamp": f"{stamp}.jpg",
        "pxl": f"PXL_{stamp}{rng.randint(0, 999):03d}.jpg",
        "img_stamp": f"IMG_{stamp}.jpg",
        "nikon": f"DSC_{n:04d}.JPG",
        "sony": f"DSC{n:05d}.JPG",
        "fuji": f"DSCF{n:04d}.JPG",
        "p": f"P{rng.randint(100, 199)}{n:04d}.JPG",
        "gopro": f"GOPR{n:04d}.JPG",
        "dji": f"DJI_{n:04d}.JPG",
        "ricoh": f"R00{n:05d}.JPG",
        "leica": f"L100{n:04d}.JPG",
    }[camera.names]


def no_exif_name(rng: random.Random, taken: datetime) -> tuple[str, str]:
    """Files that carry no EXIF: screenshots and messenger copies (name, format)."""
    if rng.random() < 0.5:
        return f"Screenshot_{taken:%Y-%m-%d-%H-%M-%S}.png", "png"
    return f"WhatsApp Image {taken:%Y-%m-%d} at {taken:%H.%M.%S}.jpeg", "jpeg"


@dataclass
class Photo:
    """One generated photo: what its upload, its EXIF job and its caption job store."""

    name: str
    format: str
    width: int
    height: int
    size_bytes: int
    orientation: int
    exif_json: str
    caption: str


class Photos:
    """A deterministic stream of photos (same seed, same photos)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.captions = Captions()
        self.camera = Zipf(CAMERAS, 0.9)

    def __next__(self) -> Photo:
        rng = self.rng
        taken = TAKEN_END - TAKEN_SPAN * rng.random()
        taken = taken.replace(microsecond=0)
        caption = self.captions(rng)
        if rng.random() < NO_EXIF_SHARE:
            name, fmt = no_exif_name(rng, taken)
            width, height = rng.choice(((1080, 2400), (1170, 2532), (1600, 1200), (1280, 960)))
            return Photo(name, fmt, width, height, width * height // 6, 1, "{}", caption)
        camera = self.camera(rng)
        orientation = rng.choice((1, 1, 1, 6, 6, 8, 3))
        exif = photo_exif(rng, camera, taken, rng.random() < GPS_SHARE, orientation)
        # The same JSON text the EXIF job writes (jobs.Runtime: sort_keys, allow_nan=False).
        exif_json = json.dumps(exif, allow_nan=False, sort_keys=True)
        place = rng.choice(("beach", "Paris", "mountains", "lake", "garden", "Rome", "park"))
        name = file_name(rng, camera, taken, place)
        size = int(camera.width * camera.height * rng.uniform(0.25, 0.6))
        return Photo(
            name, "jpeg", camera.width, camera.height, size, orientation, exif_json, caption
        )

    def __iter__(self) -> Iterator[Photo]:
        return self


# -- building the database -----------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def migrate(db_path: Path) -> None:
    store = await SqliteStore(db_path).open()
    await store.close()


def build(db_path: Path, count: int) -> dict[str, Any]:
    """`count` uploads over the last year, indexed by the triggers; returns counts and timings."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    asyncio.run(migrate(db_path))
    migrate_s = time.perf_counter() - started

    started = time.perf_counter()
    rng = random.Random(count)
    photos = Photos(seed=count)
    first = datetime.now(UTC) - timedelta(days=365)
    step = timedelta(days=365) / count
    metadata: list[tuple[Any, ...]] = []
    shapes: list[tuple[Any, ...]] = []
    images: list[tuple[Any, ...]] = []
    stats: list[tuple[Any, ...]] = []
    jobs: list[tuple[Any, ...]] = []
    fills: list[tuple[str, str, str]] = []
    shas: list[tuple[str, str]] = []  # (sha256, original name) of the bytes stored so far
    for n in range(count):
        processed = first + step * n  # strictly increasing, like real upload times
        at = iso(processed)
        began = iso(processed - timedelta(milliseconds=rng.randint(20, 400)))
        done = iso(processed + timedelta(milliseconds=rng.randint(300, 3000)))
        image_id = secrets.token_hex(12)
        if shas and rng.random() < REPEAT_SHARE:
            # The same bytes again (another device's sync, a re-import): new images row only.
            sha, name = rng.choice(shas)
        else:
            photo = next(photos)
            sha = hashlib.sha256(f"search:{count}:{n}".encode()).hexdigest()
            name = photo.name
            shas.append((sha, name))
            metadata.append((sha, photo.width, photo.height, photo.format, photo.size_bytes, at))
            shapes.append((sha, 1, photo.orientation))
            jobs += [(sha, kind, "done", 1, at, done, at, done) for kind in JOB_KINDS]
            fills.append((photo.exif_json, photo.caption, sha))
        images.append((image_id, name, at, f"originals/{image_id}.jpg", sha))
        stats.append((image_id, began, done, 1))
    generate_s = time.perf_counter() - started

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        # Durability does not matter for a benchmark database; the build's speed does.
        conn.execute("PRAGMA synchronous = OFF")
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO metadata (sha256, width, height, format, size_bytes, first_upload)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            metadata,
        )
        conn.executemany(
            "INSERT INTO image_shape (sha256, frames, orientation) VALUES (?, ?, ?)", shapes
        )
        # images_text_insert indexes each name here, as an upload does.
        conn.executemany(
            "INSERT INTO images (image_id, original_name, processed_at, image_path,"
            " metadata_sha256) VALUES (?, ?, ?, ?, ?)",
            images,
        )
        conn.executemany(
            "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, ?)",
            stats,
        )
        conn.executemany(
            "INSERT INTO jobs (sha256, kind, state, attempts, created_at, updated_at,"
            " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            jobs,
        )
        conn.execute("COMMIT")
        insert_s = time.perf_counter() - started

        # What the EXIF and caption jobs write, one row at a time: the triggers fill photo_facts
        # and image_text (caption and camera columns) as they do in production.
        started = time.perf_counter()
        for at in range(0, len(fills), FILL_BATCH):
            conn.execute("BEGIN")
            conn.executemany(
                "UPDATE metadata SET exif_json = ?, caption = ? WHERE sha256 = ?",
                fills[at : at + FILL_BATCH],
            )
            conn.execute("COMMIT")
        fill_s = time.perf_counter() - started
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("images", "metadata", "jobs", "photo_facts", "image_text")
        }
        newest_taken = conn.execute("SELECT max(taken_at) FROM photo_facts").fetchone()[0]
    finally:
        conn.close()
    return {
        "records": count,
        "seed_version": SEED_VERSION,
        "rows": counts,
        "newest_taken": newest_taken,
        "db_mib": common.mib(db_path.stat().st_size),
        "seconds": {
            "migrate": round(migrate_s, 2),
            "generate": round(generate_s, 1),
            "bulk_insert": round(insert_s, 1),
            "exif_caption_updates": round(fill_s, 1),
        },
        "exif_caption_update_us_per_row": round(fill_s / max(len(fills), 1) * 1e6, 1),
    }


def database(folder: Path, count: int) -> tuple[Path, dict[str, Any]]:
    """The database in `folder`: reused when a build of the same size and seed is there."""
    db_path = folder / "imgapi.db"
    info_path = folder / "build.json"
    if db_path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("records") == count and info.get("seed_version") == SEED_VERSION:
            return db_path, {**info, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    info = build(db_path, count)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return db_path, {**info, "reused": False}


# -- the queries ---------------------------------------------------------------------------------


@dataclass
class Query:
    name: str
    paths: list[str]  # the variants, each a path with its query string
    goal: bool  # one of the goal queries (the rest are context)


def queries(newest_taken: str) -> list[Query]:
    newest = datetime.fromisoformat(newest_taken)
    base = f"/api/images?limit={PAGE}"

    def q(value: str) -> str:
        return value.replace(" ", "+")

    dates = [(newest - timedelta(days=d)).date().isoformat() for d in TAKEN_AFTER_DAYS]
    return [
        Query("q= one common word", [f"{base}&q={w}" for w in ONE_WORD_COMMON], True),
        Query("q= one rarer word", [f"{base}&q={w}" for w in ONE_WORD_RARE], True),
        Query("q= two words", [f"{base}&q={q(w)}" for w in TWO_WORDS], True),
        Query("q= prefix", [f"{base}&q={w}" for w in PREFIXES], False),
        Query(
            "q= common, sort=uploaded",
            [f"{base}&q={w}&sort=uploaded" for w in ONE_WORD_COMMON],
            False,
        ),
        Query("camera= make", [f"{base}&camera={q(m)}" for m in MAKES], True),
        Query("camera= model", [f"{base}&camera={q(m)}" for m in MODELS], False),
        Query("taken_after=", [f"{base}&taken_after={d}" for d in dates], True),
        Query("has_gps=true&sort=taken", [f"{base}&has_gps=true&sort=taken"], False),
        Query("newest page", [base], False),
        # "q= page 2" is added once the first pages' Link headers are known.
    ]


def server_sql(path: str) -> tuple[str, list[Any]]:
    """The statement search_with_jobs runs for this request (limit + 1: it looks one ahead)."""
    query, after, limit = list_request(path, default_limit=PAGE)
    return store_sqlite._search_query(query, limit + 1, after)


def match_count(conn: sqlite3.Connection, path: str) -> int:
    query, _, _ = list_request(path, default_limit=PAGE)
    sql, params = store_sqlite._search_query(query, -1, None)  # LIMIT -1: no limit
    return conn.execute(f"SELECT count(*) FROM ({sql})", params).fetchone()[0]


def query_plan(conn: sqlite3.Connection, path: str) -> list[str]:
    """EXPLAIN QUERY PLAN as the indented tree the sqlite3 shell prints."""
    sql, params = server_sql(path)
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


def sql_ms(
    conn: sqlite3.Connection, paths: Sequence[str], repeats: int, budget_s: float
) -> dict[str, float]:
    """The server's statement alone (no jobs lookup, no JSON, no HTTP), variants round-robin,
    `repeats` times or until the budget is spent (at least 5)."""
    statements = [server_sql(p) for p in paths]
    for sql, params in statements:  # warm the page cache and the statement cache
        conn.execute(sql, params).fetchall()
    seconds: list[float] = []
    deadline = time.monotonic() + budget_s
    for sql, params in itertools.islice(itertools.cycle(statements), repeats):
        if len(seconds) >= 5 and time.monotonic() > deadline:
            break
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        seconds.append(time.perf_counter() - started)
    return {**common.latency_ms(seconds), "runs": len(seconds)}


class Client:
    """One keep-alive HTTP/1.1 connection, as a browser or a script paging through would use."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def get(self, path: str) -> tuple[float, bytes, str | None]:
        started = time.perf_counter()
        self.conn.request("GET", path)
        res = self.conn.getresponse()
        body = res.read()
        elapsed = time.perf_counter() - started
        if res.status != 200:
            raise RuntimeError(f"GET {path}: {res.status} {body[:300]!r}")
        return elapsed, body, res.getheader("link")

    def close(self) -> None:
        self.conn.close()


def next_page(link: str | None) -> str | None:
    """The path of a Link header's rel="next" URL."""
    if not link:
        return None
    url = link.split(";", 1)[0].strip().strip("<>")
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def time_query(
    client: Client, query: Query, warmup: int, requests: int, budget_s: float
) -> dict[str, Any]:
    """--requests timed requests after --warmup, or fewer when the query's time budget runs out
    first (a query taking a second must not make the run take an hour); `requests` says how
    many were timed."""
    items: list[int] = []
    sizes: list[int] = []
    for path in query.paths:  # every variant once, unmeasured: its first page and its size
        _, body, _ = client.get(path)
        items.append(len(json.loads(body)))
        sizes.append(len(body))
    variants = itertools.cycle(query.paths)
    deadline = time.monotonic() + budget_s / 4
    for _ in range(warmup):
        if time.monotonic() > deadline:
            break
        client.get(next(variants))
    latencies: list[float] = []
    deadline = time.monotonic() + budget_s
    while len(latencies) < requests and (len(latencies) < 10 or time.monotonic() < deadline):
        latencies.append(client.get(next(variants))[0])
    return {
        "requests": len(latencies),
        "items": min(items),
        "response_kib": round(max(sizes) / 1024, 1),
        "latency_ms": common.latency_ms(latencies),
    }


def run_queries(
    args: argparse.Namespace, workdir: Path, db_path: Path, newest_taken: str
) -> dict[str, Any]:
    settings = common.service_settings(
        workdir, DB_PATH=str(db_path), MEDIA_DIR=str(db_path.parent / "media")
    )
    proc = procs.start_api(settings, workdir / "api.log", workers=1, ready_within=120)
    results: dict[str, Any] = {}
    try:
        client = Client(proc.url)
        try:
            todo = queries(newest_taken)
            # The second page of each common word's search, from its first page's Link header.
            pages = [next_page(client.get(p)[2]) for p in todo[0].paths]
            todo.append(Query("q= common, page 2 (Link)", [p for p in pages if p], False))
            for query in todo:
                results[query.name] = {
                    "goal": query.goal,
                    "examples": query.paths,
                    **time_query(client, query, args.warmup, args.requests, args.query_seconds),
                }
                print(f"  {query.name}: {results[query.name]['latency_ms']}", file=sys.stderr)
        finally:
            client.close()
    finally:
        proc.stop()
    # Context, read while no server runs: how many rows match, the SQL alone, and its plan.
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for query in todo:
            result = results[query.name]
            counts = [match_count(conn, p) for p in query.paths]
            result["matches"] = {"min": min(counts), "max": max(counts), "each": counts}
            result["sql_ms"] = sql_ms(conn, query.paths, args.requests, args.query_seconds / 4)
            result["plan"] = query_plan(conn, query.paths[0])
    finally:
        conn.close()
    return results


# -- the index's cost on the upload write path ---------------------------------------------------


async def write_cost(
    workdir: Path, uploads: int, rounds: int, base: Path | None = None
) -> dict[str, Any]:
    """record_success + set_exif + set_caption per upload, on a database with the index triggers
    and on one without them (same schema otherwise), in interleaved rounds (ABBA order, so a
    change of load on a shared machine falls on both alike). Fresh databases, or with `base`
    two copies of it (an FTS write costs more in a large index: more segments to merge)."""
    photos = Photos(seed=7)
    batch = [next(photos) for _ in range(uploads)]
    stores: dict[str, SqliteStore] = {}
    for variant in ("indexed", "no_index"):
        path = workdir / f"writes-{variant}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if base is not None:
            # The backup API copies a consistent snapshot whatever the WAL holds.
            with (
                contextlib.closing(sqlite3.connect(base)) as src,
                contextlib.closing(sqlite3.connect(path)) as dst,
            ):
                src.backup(dst)
        store = await SqliteStore(path).open()
        if variant == "no_index":
            drop_index_triggers(path)  # dropped after migration: the schema is otherwise equal
        stores[variant] = store
    per_round = max(uploads // rounds, 1)
    seconds: dict[str, list[float]] = {v: [] for v in stores}
    try:
        for r in range(rounds):
            chunk = batch[r * per_round : (r + 1) * per_round]
            order = list(stores) if r % 2 == 0 else list(reversed(stores))
            for variant in order:
                seconds[variant].append(await _uploads(stores[variant], chunk, f"{variant}{r}"))
        facts = {}
        for variant, store in stores.items():
            facts[variant] = await store.read(
                lambda c: [
                    c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("photo_facts", "image_text")
                ]
            )
    finally:
        for store in stores.values():
            await store.close()
    done = per_round * rounds
    total = {v: sum(s) for v, s in seconds.items()}
    ratios = [a / b for a, b in zip(seconds["indexed"], seconds["no_index"], strict=True)]
    cost = total["indexed"] / total["no_index"] - 1
    return {
        "database": "fresh" if base is None else "a copy of the queries' database",
        "uploads_each": done,
        "rounds": rounds,
        "seconds": {v: round(s, 3) for v, s in total.items()},
        "us_per_upload": {v: round(s / done * 1e6, 1) for v, s in total.items()},
        "extra_us_per_upload": round((total["indexed"] - total["no_index"]) / done * 1e6, 1),
        "ratio": round(total["indexed"] / total["no_index"], 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_median_of_rounds": round(statistics.median(ratios), 3),
        "cost": round(cost, 4),
        "rows_photo_facts_image_text": facts,
    }


async def _uploads(store: SqliteStore, photos: Sequence[Photo], tag: str) -> float:
    """Wall seconds for these uploads' writes, one after another, as one API process does them."""
    started = time.perf_counter()
    for n, photo in enumerate(photos):
        image_id = f"{tag}-{n}-{secrets.token_hex(6)}"
        sha = hashlib.sha256(image_id.encode()).hexdigest()
        stamp = store_sqlite.now_iso()
        await store.record_success(
            NewUpload(
                image_id=image_id,
                original_name=photo.name,
                processed_at=stamp,
                start_time=stamp,
                original_key=f"originals/{image_id}.jpg",
                sha256=sha,
                width=photo.width,
                height=photo.height,
                format=photo.format,
                size_bytes=photo.size_bytes,
                jobs=dict.fromkeys(JOB_KINDS, ("queued", None)),
                orientation=photo.orientation,
            )
        )
        await store.set_exif(sha, photo.exif_json)
        await store.set_caption(sha, photo.caption)
    return time.perf_counter() - started


def drop_index_triggers(db_path: Path) -> None:
    """The schema without search upkeep: photo_facts and image_text stay (empty), as they would
    in a build without search, and every other table, index and trigger is as migrated."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for trigger in INDEX_TRIGGERS:
            conn.execute(f"DROP TRIGGER {trigger}")
    finally:
        conn.close()


def http_uploads(workdir: Path, uploads: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """Upload throughput over HTTP, `python imgapi.py` with and without the index triggers.

    bench_uploads.py always makes a fresh database of its own (it cannot be pointed at one), so
    this is the same measurement in small: two APIs side by side (the default WORKER: the
    thumbnail and EXIF jobs run in the API process, captions off), byte-unique copies of small
    real camera JPEGs with EXIF (small, so that fixed per-upload costs such as the index weigh
    the most), ABBA-interleaved rounds, each round timed until its jobs have finished. Server
    CPU per upload is reported beside wall time: on a shared machine it is the steadier number.
    """
    jpegs = [(p.name, p.read_bytes()) for p in (common.CORPUS / "photos" / n for n in HTTP_PHOTOS)]
    servers: dict[str, procs.Proc] = {}
    try:
        for variant in ("indexed", "no_index"):
            folder = workdir / f"http-{variant}"
            settings = common.service_settings(folder)
            db_path = Path(settings["DB_PATH"])
            asyncio.run(migrate(db_path))
            if variant == "no_index":
                drop_index_triggers(db_path)
            servers[variant] = procs.start_api(settings, folder / "api.log", workers=1)
        return asyncio.run(_http_rounds(servers, jpegs, uploads, rounds, concurrency))
    finally:
        for proc in servers.values():
            proc.stop()


async def _http_rounds(
    servers: dict[str, procs.Proc],
    jpegs: list[tuple[str, bytes]],
    uploads: int,
    rounds: int,
    concurrency: int,
) -> dict[str, Any]:
    import httpx  # a bench extra (pyproject [bench]); only this part needs it

    numbers = itertools.count()
    per_round = max(uploads // rounds, 1)
    wall: dict[str, list[float]] = {v: [] for v in servers}
    cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:

        async def batch(proc: procs.Proc, count: int) -> float:
            """`count` uploads, `concurrency` at a time, then until their jobs are done."""
            issued = itertools.count()

            async def one_client() -> None:
                while next(issued) < count:
                    n = next(numbers)
                    name, jpeg = jpegs[n % len(jpegs)]
                    form = common.Multipart(name)
                    payload = f"imgapi-bench-search {n:09d}".encode()
                    body = b"".join(form.pieces(common.unique_jpeg(jpeg, payload)))
                    res = await client.post(
                        proc.url + "/api/images",
                        content=body,
                        headers={"content-type": form.content_type},
                    )
                    if res.status_code != 201:
                        raise RuntimeError(f"upload: {res.status_code} {res.text[:300]}")

            started = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            while True:
                stats = (await client.get(proc.url + "/api/stats")).json()
                if stats["queued_jobs"] == 0 and stats["processing"] == 0:
                    return time.perf_counter() - started
                await asyncio.sleep(0.02)

        for proc in servers.values():  # warm-up: imports, first connections, page cache
            await batch(proc, concurrency * 2)
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for variant in order:
                pids = common.group_pids(servers[variant].pid)
                before = common.cpu_seconds(pids)
                wall[variant].append(await batch(servers[variant], per_round))
                cpu[variant] += common.cpu_seconds(pids) - before
    done = per_round * rounds
    total = {v: sum(s) for v, s in wall.items()}
    return {
        "photos": list(HTTP_PHOTOS),
        "uploads_each": done,
        "rounds": rounds,
        "concurrency": concurrency,
        "uploads_per_s": {v: round(done / s, 1) for v, s in total.items()},
        "server_cpu_ms_per_upload": {v: round(c / done * 1000, 2) for v, c in cpu.items()},
        # > 1: uploads are slower with the index (wall time, jobs included).
        "wall_ratio": round(total["indexed"] / total["no_index"], 3),
        "wall_ratio_per_round": [
            round(a / b, 3) for a, b in zip(wall["indexed"], wall["no_index"], strict=True)
        ],
        "cpu_ratio": round(cpu["indexed"] / cpu["no_index"], 3),
    }


# -- output --------------------------------------------------------------------------------------


def meets(latency: dict[str, float]) -> bool:
    return latency["p50"] <= GOAL_P50_MS and latency["p99"] <= GOAL_P99_MS


def tables(report: dict[str, Any]) -> list[str]:
    out = []
    if "queries" in report:
        out += query_tables(report)
    if "write_cost" in report:
        out.append(write_table(report["write_cost"]))
    if "http_uploads" in report:
        out.append(http_table(report["http_uploads"]))
    return out


def query_tables(report: dict[str, Any]) -> list[str]:
    """The build, the latency table, and each query's plan."""
    build = report["build"]
    seconds = build["seconds"]
    build_line = (
        f"Build: {'reused' if build['reused'] else 'built'}; migrate {seconds['migrate']} s, "
        f"generate {seconds['generate']} s, bulk insert {seconds['bulk_insert']} s, "
        f"EXIF+caption UPDATEs (triggers filling photo_facts and image_text) "
        f"{seconds['exif_caption_updates']} s = {build['exif_caption_update_us_per_row']} µs/row"
    )
    rows = []
    for name, q in report["queries"].items():
        lat = q["latency_ms"]
        matches = q["matches"]
        rows.append(
            [
                name,
                "issue" if q["goal"] else "context",
                q["requests"],
                f"{matches['min']:,}-{matches['max']:,}",
                q["items"],
                lat["p50"],
                lat["p95"],
                lat["p99"],
                lat["max"],
                q["sql_ms"]["p50"],
                meets(lat),
            ]
        )
    latency = (
        f"GET /api/images?limit={PAGE} on {build['records']:,} records "
        f"({build['db_mib']} MiB): n sequential requests per query (at most {report['requests']}, "
        f"or what {report['query_seconds']:g} s allow) after up to {report['warmup']} warm-up, "
        f"one keep-alive connection, variants round-robin; SQL p50: the server's statement "
        f"alone, in-process\n\n"
        + common.markdown_table(
            [
                "query",
                "goal",
                "n",
                "matches",
                "items",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "SQL p50 ms",
                f"p50 <= {GOAL_P50_MS:g}, p99 <= {GOAL_P99_MS:g}",
            ],
            rows,
        )
    )
    plans = ["Query plans (first variant of each)"]
    for name, q in report["queries"].items():
        plans.append(f"\n{name}: {q['examples'][0]}\n" + "\n".join(q["plan"]))
    return [build_line, latency, "\n".join(plans)]


def write_table(costs: dict[str, dict[str, Any]]) -> str:
    first = next(iter(costs.values()))
    rows = []
    for size, w in costs.items():
        rows.append(
            [
                size,
                w["us_per_upload"]["indexed"],
                w["us_per_upload"]["no_index"],
                w["extra_us_per_upload"],
                w["ratio"],
                w["ratio_median_of_rounds"],
            ]
        )
    return (
        f"Upload writes alone (record_success + set_exif + set_caption, 3 transactions) through "
        f"SqliteStore, {first['uploads_each']:,} per database, {first['rounds']} interleaved "
        f"rounds: the write path only, not an upload's decoding, files and jobs\n\n"
        + common.markdown_table(
            [
                "database",
                "µs/upload, triggers",
                "µs/upload, dropped",
                "index µs/upload",
                "ratio",
                "median of rounds",
            ],
            rows,
        )
    )


def http_table(h: dict[str, Any]) -> str:
    cost = h["cpu_ratio"] - 1
    return (
        f"HTTP uploads (python imgapi.py, jobs in-process, captions off), {h['uploads_each']} "
        f"each of {', '.join(h['photos'])}, {h['concurrency']} at a time, {h['rounds']} "
        f"interleaved rounds timed until their jobs finished\n\n"
        + common.markdown_table(
            ["database", "uploads/s", "server CPU ms per upload"],
            [
                [
                    "with index triggers",
                    h["uploads_per_s"]["indexed"],
                    h["server_cpu_ms_per_upload"]["indexed"],
                ],
                [
                    "triggers dropped",
                    h["uploads_per_s"]["no_index"],
                    h["server_cpu_ms_per_upload"]["no_index"],
                ],
            ],
        )
        + f"\n\nwall ratio {h['wall_ratio']} (rounds {h['wall_ratio_per_round']}), CPU ratio "
        f"{h['cpu_ratio']}; goal: index cost <= {GOAL_WRITE_COST:.0%} of upload throughput: "
        + ("yes" if cost <= GOAL_WRITE_COST else "NO")
    )


# -- main ----------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    # A SystemExit unwinds through the finally blocks: the API stops and temp dirs go.
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="uploads in the database")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per query")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per query first")
    parser.add_argument(
        "--query-seconds",
        type=float,
        default=12.0,
        help="time budget per query: fewer requests are timed when it runs out",
    )
    parser.add_argument(
        "--write-uploads", type=int, default=2000, help="uploads per variant for the write cost"
    )
    parser.add_argument("--write-rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument(
        "--keep", type=Path, help="build the database in DIR and keep it; reuse one found there"
    )
    parser.add_argument(
        "--http-uploads", type=int, default=240, help="uploads per variant for the HTTP comparison"
    )
    parser.add_argument("--http-rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--http-concurrency", type=int, default=4)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="any of queries, writes, http (comma-separated)"
    )
    parser.add_argument("--workdir", type=Path, help="where temporary files go (default: /tmp)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes any of {', '.join(PARTS)}")
    signal.signal(signal.SIGTERM, _terminate)

    report: dict[str, Any] = {
        "benchmark": "search",
        "environment": common.environment(),
        "requests": args.requests,
        "warmup": args.warmup,
        "query_seconds": args.query_seconds,
        "goals_ms": {"p50": GOAL_P50_MS, "p99": GOAL_P99_MS},
    }
    workdir = Path(tempfile.mkdtemp(prefix="imgapi-bench-search-", dir=args.workdir))
    db_path: Path | None = None  # the queries' database, when that part runs
    try:
        if "queries" in parts:
            folder = args.keep.resolve() if args.keep else workdir / "data"
            db_path, info = database(folder, args.records)
            report["build"] = info
            print(f"  database ready: {info['seconds']}", file=sys.stderr)
            report["queries"] = run_queries(args, workdir, db_path, info["newest_taken"])
        if "writes" in parts:
            report["write_cost"] = {
                "fresh": asyncio.run(write_cost(workdir, args.write_uploads, args.write_rounds))
            }
            if db_path is not None:
                print("  write cost on a fresh database done", file=sys.stderr)
                report["write_cost"][f"at {args.records:,}"] = asyncio.run(
                    write_cost(workdir, args.write_uploads, args.write_rounds, db_path)
                )
        if "http" in parts:
            report["http_uploads"] = http_uploads(
                workdir, args.http_uploads, args.http_rounds, args.http_concurrency
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    goals = []
    for name, q in report.get("queries", {}).items():
        if q["goal"]:
            lat = q["latency_ms"]
            goals.append(
                [f"{name}: p50 <= 20 ms, p99 <= 60 ms", [lat["p50"], lat["p99"]], meets(lat)]
            )
    if "http_uploads" in report:
        # CPU per upload: what bounds throughput on a busy machine, and steadier than wall time.
        cost = round(report["http_uploads"]["cpu_ratio"] - 1, 4)
        goals.append(
            [
                "index cost on upload throughput <= 5% (server CPU per upload)",
                cost,
                cost <= GOAL_WRITE_COST,
            ]
        )
    report["goals"] = goals
    common.emit(report, tables(report), args.json_out)


if __name__ == "__main__":
    main()
