-- Sessions, the connection audit trail and revocations of the session service.
-- The same text runs on SQLite and PostgreSQL: TEXT, INTEGER and BIGINT mean
-- the same on both, JSON is kept as TEXT, and no table needs a generated key.
-- Timestamps are milliseconds (or, for revocations, seconds) since the Unix epoch.

CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    closed_ms  BIGINT,
    node       TEXT,
    -- JSON array of channel names.
    subs       TEXT NOT NULL DEFAULT '[]',
    -- JSON array of {"channel", "expires_at"}.
    grants     TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS sessions_updated_ms ON sessions (updated_ms);
CREATE INDEX IF NOT EXISTS sessions_user_id ON sessions (user_id);

-- Append-only; written in batches, pruned by age.
CREATE TABLE IF NOT EXISTS connections (
    client  TEXT NOT NULL,
    session TEXT NOT NULL,
    user_id TEXT NOT NULL,
    node    TEXT NOT NULL,
    event   TEXT NOT NULL CHECK (event IN ('connect', 'disconnect')),
    -- The close code of a disconnect.
    code    INTEGER,
    at_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS connections_user_id ON connections (user_id);
CREATE INDEX IF NOT EXISTS connections_at_ms ON connections (at_ms);

-- Tokens of user_id issued (iat) before before_secs are refused.
CREATE TABLE IF NOT EXISTS revocations (
    user_id     TEXT PRIMARY KEY,
    before_secs BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL
);
