-- pipecat-roark schema v1: calls, their raw event timeline, recording chunks, and the outbox.
-- Times are integers: microseconds since the Unix epoch (UTC).

PRAGMA application_id = 1885565554;  -- 'pcrr': marks the file as ours

CREATE TABLE calls (
    id              TEXT PRIMARY KEY,          -- pipecatCallId
    agent_id        TEXT NOT NULL,
    agent_name      TEXT,
    key_fp          TEXT,                      -- API-key fingerprint; NULL: recorded without a key
    state           TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'ended')),
    end_reason      TEXT,
    sample_rate     INTEGER,
    num_channels    INTEGER,
    owner_host      TEXT NOT NULL,
    owner_pid       INTEGER NOT NULL,
    owner_token     TEXT NOT NULL,             -- identifies the owner process beyond its pid
    started_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    heartbeat_at    INTEGER NOT NULL
);
CREATE INDEX calls_open ON calls (state, heartbeat_at);

CREATE TABLE events (
    id       INTEGER PRIMARY KEY,              -- commit order = the order the observer saw them
    call_id  TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    body     BLOB NOT NULL                     -- msgpack, see events.py
);
CREATE INDEX events_call ON events (call_id, id);

CREATE TABLE chunks (
    call_id       TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    path          TEXT NOT NULL,               -- relative to the data directory
    size          INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    sample_rate   INTEGER NOT NULL,
    num_channels  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (call_id, idx)
) WITHOUT ROWID;

CREATE TABLE deliveries (
    id                INTEGER PRIMARY KEY,
    call_id           TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    kind              TEXT NOT NULL CHECK (kind IN ('call-started', 'chunk', 'call-ended')),
    chunk_idx         INTEGER,
    idempotency_key   TEXT NOT NULL UNIQUE,
    state             TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NOT NULL,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    last_error        TEXT,
    created_at        INTEGER NOT NULL,
    delivered_at      INTEGER
);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_call ON deliveries (call_id, kind, state);

-- API keys Roark refused: deliveries for that fingerprint wait until a drainer with a
-- working key clears the row.
CREATE TABLE paused_keys (
    key_fp     TEXT PRIMARY KEY,
    paused_at  INTEGER NOT NULL,
    reason     TEXT NOT NULL
);
