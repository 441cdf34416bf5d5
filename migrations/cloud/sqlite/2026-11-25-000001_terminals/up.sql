-- Enrolled terminals. Only the sha256 of a token is stored, never the token itself.
CREATE TABLE terminals (
    terminal_id TEXT PRIMARY KEY,
    branch_id   TEXT NOT NULL,
    name        TEXT,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP
);
CREATE INDEX terminals_branch_idx ON terminals (branch_id);
