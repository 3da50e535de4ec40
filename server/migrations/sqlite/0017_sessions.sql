-- Sessions of the web page (POST /login): only the SHA-256 of each session ID is kept, with
-- the role it grants, the SHA-256 of the token that opened it (rotating that token ends the
-- session) and when it ends. Loaded at start-up, so a session outlives a restart.

CREATE TABLE sessions (
    id_sha256    TEXT PRIMARY KEY,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    token_sha256 TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
