"""The PostgreSQL schema: its numbered migrations, and the function that applies them.

The tables and columns are SQLite's final ones (imgapi_core.store.sqlite, migrations 1..10), so
that the rest of the code, the API and `migrate-store` see the same rows on either engine.
Timestamps stay TEXT in RFC 3339 UTC with milliseconds (imgapi_core.timestamps.now_iso), as SQLite
keeps them: they pass through to the API as they are, and sort as text. The key and time columns
use the "C" collation, so they sort byte by byte like SQLite's BINARY, whatever the database's
locale.

Numbered from 1 for this engine alone (a PostgreSQL database starts at the final shape; there is no
seed database to convert). Each migration runs in its own transaction under one advisory lock, and
is recorded in `schema_version` in that transaction: several processes starting at once apply each
migration once, and a second start is a read, with no lock and no write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgapi_core.timestamps import now_iso

if TYPE_CHECKING:
    import asyncpg

# pg_advisory_xact_lock key of schema changes ("imgapi" in ASCII, then 0); the event log's is
# the same with 1 (imgapi_core.store.postgres).
MIGRATION_LOCK = 0x696D67617069_0000

# What a column's DEFAULT writes when a row names no time: now_iso()'s shape.
_NOW = """to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the seed's three tables (names and columns as SQLite keeps them), and the jobs table in
    # its final shape (the state 'unavailable', lapses), with the indexes that listing, joins and
    # the job sweeper read through. REAL in SQLite is DOUBLE PRECISION here (REAL would be 4 bytes).
    f"""
    CREATE TABLE metadata (
      sha256 TEXT COLLATE "C" PRIMARY KEY,
      width INTEGER,
      height INTEGER,
      format TEXT,
      size_bytes BIGINT,
      first_upload TEXT COLLATE "C" DEFAULT {_NOW},
      exif_json TEXT,
      caption TEXT
    );
    CREATE TABLE images (
      image_id TEXT COLLATE "C" PRIMARY KEY,
      original_name TEXT NOT NULL,
      processed_at TEXT COLLATE "C" DEFAULT {_NOW},
      image_path TEXT COLLATE "C",
      metadata_sha256 TEXT COLLATE "C" REFERENCES metadata (sha256),
      error TEXT
    );
    CREATE TABLE stats (
      image_id TEXT COLLATE "C" PRIMARY KEY REFERENCES images (image_id) ON DELETE CASCADE,
      start_time TEXT COLLATE "C" DEFAULT {_NOW},
      end_time TEXT COLLATE "C",
      status INTEGER NOT NULL
    );
    CREATE TABLE jobs (
      sha256 TEXT COLLATE "C" NOT NULL REFERENCES metadata (sha256) ON DELETE CASCADE,
      kind TEXT COLLATE "C" NOT NULL CHECK (kind IN ('thumbnail', 'exif', 'caption')),
      state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped', 'unavailable')),
      attempts INTEGER NOT NULL DEFAULT 0,
      error TEXT,
      created_at TEXT COLLATE "C" NOT NULL,
      updated_at TEXT COLLATE "C" NOT NULL,
      started_at TEXT COLLATE "C",
      finished_at TEXT COLLATE "C",
      run_after DOUBLE PRECISION NOT NULL DEFAULT 0,
      lease_until DOUBLE PRECISION,
      runner TEXT,
      lapses INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (sha256, kind)
    );
    CREATE INDEX images_newest ON images (processed_at DESC, image_id DESC);
    CREATE INDEX images_ok_newest ON images (processed_at DESC, image_id DESC)
      WHERE error IS NULL;
    CREATE INDEX images_failed_newest ON images (processed_at DESC, image_id DESC)
      WHERE error IS NOT NULL;
    CREATE INDEX images_by_sha ON images (metadata_sha256);
    CREATE INDEX jobs_due ON jobs (state, run_after);
    CREATE INDEX stats_open ON stats (image_id) WHERE end_time IS NULL;
    """,
    # 2: access control. Keys are kept as the SHA-256 of their token, never the token; the upload's
    # delete token likewise. Secrets: the URL-signing key, made once.
    """
    CREATE TABLE api_keys (
      name TEXT COLLATE "C" PRIMARY KEY,
      key_id TEXT COLLATE "C" NOT NULL UNIQUE,
      token_hash TEXT NOT NULL,
      scopes TEXT NOT NULL,
      created_at TEXT COLLATE "C" NOT NULL,
      last_used_at TEXT COLLATE "C",
      revoked_at TEXT COLLATE "C"
    );
    CREATE TABLE secrets (
      name TEXT COLLATE "C" PRIMARY KEY,
      value TEXT NOT NULL,
      created_at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE delete_tokens (
      image_id TEXT COLLATE "C" PRIMARY KEY REFERENCES images (image_id) ON DELETE CASCADE,
      token_hash TEXT NOT NULL
    );
    """,
    # 3: frames and EXIF orientation of each image's bytes, beside the seed's metadata table.
    """
    CREATE TABLE image_shape (
      sha256 TEXT COLLATE "C" PRIMARY KEY REFERENCES metadata (sha256) ON DELETE CASCADE,
      frames INTEGER NOT NULL DEFAULT 1,
      orientation INTEGER NOT NULL DEFAULT 1
    );
    """,
    # 4: the event log and webhook deliveries, written in the transaction of the change they
    # describe. Event ids: an identity BY DEFAULT, so that migrate-store can copy SQLite's ids
    # (and move the sequence past them). Deliveries carry their event, since events are pruned.
    """
    CREATE TABLE events (
      id BIGINT GENERATED BY DEFAULT AS IDENTITY (SEQUENCE NAME events_id_seq) PRIMARY KEY,
      type TEXT NOT NULL,
      image_id TEXT COLLATE "C" NOT NULL,
      kind TEXT,
      state TEXT,
      error TEXT,
      created_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX events_by_time ON events (created_at);
    CREATE TABLE webhook_deliveries (
      delivery_id TEXT COLLATE "C" PRIMARY KEY,
      event_id BIGINT NOT NULL,
      event_type TEXT NOT NULL,
      image_id TEXT COLLATE "C" NOT NULL,
      url TEXT NOT NULL,
      state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivering', 'delivered', 'failed')),
      attempts INTEGER NOT NULL DEFAULT 0,
      next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
      lease_until DOUBLE PRECISION,
      runner TEXT,
      last_status INTEGER,
      last_error TEXT,
      event_json TEXT NOT NULL,
      body TEXT,
      created_at TEXT COLLATE "C" NOT NULL,
      updated_at TEXT COLLATE "C" NOT NULL,
      delivered_at TEXT COLLATE "C"
    );
    CREATE INDEX deliveries_due ON webhook_deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_newest ON webhook_deliveries (created_at DESC, delivery_id DESC);
    """,
    # 5: search, as SQLite's migration 10 does it with FTS5. photo_facts holds what filters read
    # from the EXIF (the date taken on the camera's clock as YYYY-MM-DDTHH:MM:SS; make, model,
    # lens; GPS); image_text holds each upload's words (its name, its caption, its camera) and
    # their tsvector, under a GIN index. Triggers keep both right in the transaction of every
    # change of their sources, whatever order the rows come in (migrate-store copies photo_facts
    # after images).
    #
    # The words: unaccent() takes the accents off (FTS5's remove_diacritics), punctuation becomes
    # spaces (FTS5's unicode61 splits "p2.jpg" into p2 and jpg, where PostgreSQL's parser would
    # keep one "file" token), lower case, then the 'simple' configuration (no stemming, no stop
    # words). Each field has its own weight (A name, B caption, C camera): a phrase a query word
    # makes ("p2.jpg") must match within one field, as in FTS5, although tsvector positions run
    # on from one field to the next. The query side is built from the same function
    # (PostgresStore._search_tsquery).
    """
    CREATE EXTENSION IF NOT EXISTS unaccent;
    CREATE FUNCTION imgapi_search_text(words text) RETURNS text
      LANGUAGE sql STABLE PARALLEL SAFE
      RETURN lower(regexp_replace(unaccent('unaccent'::regdictionary, coalesce(words, '')),
                                  '[[:punct:]]+', ' ', 'g'));
    CREATE FUNCTION imgapi_search_document(original_name text, caption text, camera text)
      RETURNS tsvector
      LANGUAGE sql STABLE PARALLEL SAFE
      RETURN setweight(to_tsvector('simple', imgapi_search_text(original_name)), 'A')
          || setweight(to_tsvector('simple', imgapi_search_text(caption)), 'B')
          || setweight(to_tsvector('simple', imgapi_search_text(camera)), 'C');

    CREATE TABLE photo_facts (
      sha256 TEXT COLLATE "C" PRIMARY KEY REFERENCES metadata (sha256) ON DELETE CASCADE,
      taken_at TEXT COLLATE "C",
      make TEXT,
      model TEXT,
      lens TEXT,
      has_gps BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX photo_facts_taken ON photo_facts (taken_at);
    -- camera= compares lower(make) or lower(model) (SQLite: COLLATE NOCASE)
    CREATE INDEX photo_facts_make ON photo_facts (lower(make));
    CREATE INDEX photo_facts_model ON photo_facts (lower(model));

    CREATE TABLE image_text (
      image_id TEXT COLLATE "C" PRIMARY KEY REFERENCES images (image_id) ON DELETE CASCADE,
      original_name TEXT,
      caption TEXT,
      camera TEXT,
      document tsvector NOT NULL
    );
    CREATE INDEX image_text_document ON image_text USING gin (document);

    CREATE FUNCTION imgapi_image_text_document() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      NEW.document := imgapi_search_document(NEW.original_name, NEW.caption, NEW.camera);
      RETURN NEW;
    END $$;
    CREATE TRIGGER image_text_document BEFORE INSERT OR UPDATE ON image_text
      FOR EACH ROW EXECUTE FUNCTION imgapi_image_text_document();

    -- Each new upload (failed ones too: they are found by name) gets its row, with the caption
    -- and the camera its bytes already have.
    CREATE FUNCTION imgapi_images_text() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO image_text (image_id, original_name, caption, camera)
      SELECT NEW.image_id, NEW.original_name,
        (SELECT m.caption FROM metadata m WHERE m.sha256 = NEW.metadata_sha256),
        (SELECT trim(coalesce(f.make, '') || ' ' || coalesce(f.model, '') || ' '
                     || coalesce(f.lens, ''))
           FROM photo_facts f WHERE f.sha256 = NEW.metadata_sha256);
      RETURN NULL;
    END $$;
    CREATE TRIGGER images_text_insert AFTER INSERT ON images
      FOR EACH ROW EXECUTE FUNCTION imgapi_images_text();

    CREATE FUNCTION imgapi_metadata_caption_text() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      UPDATE image_text SET caption = NEW.caption
        WHERE image_id IN (SELECT image_id FROM images WHERE metadata_sha256 = NEW.sha256);
      RETURN NULL;
    END $$;
    CREATE TRIGGER metadata_caption_text AFTER UPDATE OF caption ON metadata
      FOR EACH ROW WHEN (OLD.caption IS DISTINCT FROM NEW.caption)
      EXECUTE FUNCTION imgapi_metadata_caption_text();

    -- The facts of the EXIF, when it is JSON (SQLite: WHEN json_valid(new.exif_json)); EXIF that
    -- is not leaves the facts as they were. A key present with a JSON null counts as present
    -- for GPS, as SQLite's json_type() says.
    CREATE FUNCTION imgapi_metadata_facts() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      exif jsonb;
      taken text;
    BEGIN
      BEGIN
        exif := NEW.exif_json::jsonb;
      EXCEPTION WHEN OTHERS THEN
        RETURN NULL;
      END;
      taken := coalesce(exif ->> 'DateTimeOriginal', exif ->> 'DateTime');
      INSERT INTO photo_facts AS f (sha256, taken_at, make, model, lens, has_gps)
      VALUES (
        NEW.sha256,
        CASE WHEN taken ~ '^[0-9]{4}:[0-9]{2}:[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}'
          THEN substr(taken, 1, 4) || '-' || substr(taken, 6, 2) || '-' || substr(taken, 9, 2)
            || 'T' || substr(taken, 12, 8) END,
        nullif(trim(exif ->> 'Make'), ''),
        nullif(trim(exif ->> 'Model'), ''),
        nullif(trim(exif ->> 'LensModel'), ''),
        jsonb_typeof(exif) = 'object' AND exif ? 'latitude' AND exif ? 'longitude')
      ON CONFLICT (sha256) DO UPDATE SET
        taken_at = EXCLUDED.taken_at, make = EXCLUDED.make, model = EXCLUDED.model,
        lens = EXCLUDED.lens, has_gps = EXCLUDED.has_gps;
      RETURN NULL;
    END $$;
    CREATE TRIGGER metadata_facts AFTER INSERT OR UPDATE OF exif_json ON metadata
      FOR EACH ROW WHEN (NEW.exif_json IS NOT NULL)
      EXECUTE FUNCTION imgapi_metadata_facts();

    CREATE FUNCTION imgapi_photo_facts_text() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      UPDATE image_text
        SET camera = trim(coalesce(NEW.make, '') || ' ' || coalesce(NEW.model, '') || ' '
                          || coalesce(NEW.lens, ''))
        WHERE image_id IN (SELECT image_id FROM images WHERE metadata_sha256 = NEW.sha256);
      RETURN NULL;
    END $$;
    CREATE TRIGGER photo_facts_text AFTER INSERT OR UPDATE ON photo_facts
      FOR EACH ROW EXECUTE FUNCTION imgapi_photo_facts_text();

    -- Rows already there (none in a new database) are indexed by the same triggers.
    UPDATE metadata SET exif_json = exif_json WHERE exif_json IS NOT NULL;
    INSERT INTO image_text (image_id, original_name, caption, camera)
      SELECT i.image_id, i.original_name, m.caption,
        trim(coalesce(f.make, '') || ' ' || coalesce(f.model, '') || ' ' || coalesce(f.lens, ''))
      FROM images i
      LEFT JOIN metadata m ON m.sha256 = i.metadata_sha256
      LEFT JOIN photo_facts f ON f.sha256 = i.metadata_sha256;
    """,
)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The newest migration applied; 0 in a new database. A read: it works on a read-only one."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")


async def migrate(conn: asyncpg.Connection) -> int:
    """Applies the migrations not yet applied, each in the transaction that records it; returns
    how many this call applied (0 when another process got there first, or nothing was due)."""
    if await schema_version(conn) >= len(MIGRATIONS):
        return 0  # the usual start: no lock taken, nothing written
    async with conn.transaction():
        # Under the lock: two sessions creating one table at once can fail on the catalog's
        # unique indexes instead of one of them waiting.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
    applied = 0
    for version, script in enumerate(MIGRATIONS, start=1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = await conn.fetchval("SELECT 1 FROM schema_version WHERE version = $1", version)
            if done:  # an earlier start, or another process while this one waited for the lock
                continue
            # No arguments: the simple query protocol, which runs a script of statements.
            await conn.execute(script)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                version,
                now_iso(),
            )
            applied += 1
    return applied
