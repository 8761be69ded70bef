-- The web console: user accounts (the other way to log in besides an API key) and login sessions.
-- Kept identical to the other backend's migration of the same number.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    -- Unique across tenants: the login form asks for nothing else.
    username      TEXT NOT NULL UNIQUE,
    -- Argon2id, in the PHC string format (salt and parameters included).
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at    BIGINT NOT NULL,
    disabled_at   BIGINT
);
CREATE INDEX users_tenant ON users(tenant_id);

-- In the database rather than in a replica's memory: any replica serves any session, and logging
-- out or disabling the key or user ends it everywhere at once.
CREATE TABLE console_sessions (
    -- SHA-256 of the cookie's secret: a copy of this table logs nobody in.
    id_hash     BYTEA PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    -- Exactly one of the two: what the session logged in with, checked again on every request.
    api_key_id  TEXT REFERENCES api_keys(id),
    user_id     TEXT REFERENCES users(id),
    -- Forms carry it back; a cross-site form cannot know it.
    csrf        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    CHECK ((api_key_id IS NULL) <> (user_id IS NULL))
);
CREATE INDEX console_sessions_expires ON console_sessions(expires_at);
