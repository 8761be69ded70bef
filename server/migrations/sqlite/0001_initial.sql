-- Times are unix milliseconds (BIGINT), ids are TEXT: the same types on SQLite and PostgreSQL, so
-- one set of queries serves both backends.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE bootstrap_tokens (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    secret_hash  BLOB NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    uses_allowed BIGINT,
    uses         BIGINT NOT NULL DEFAULT 0,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX bootstrap_tokens_tenant ON bootstrap_tokens(tenant_id);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    secret_hash  BLOB NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    description  TEXT NOT NULL DEFAULT '',
    revoked_at   BIGINT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    hardware_id     TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    public_key      TEXT NOT NULL,
    facts           TEXT NOT NULL DEFAULT '{}',
    enrolled_at     BIGINT NOT NULL,
    enrolled_with   TEXT,
    deregistered_at BIGINT,
    last_auth_nonce TEXT,
    last_heartbeat  BIGINT,
    interval_s      BIGINT,
    agent_version   TEXT,
    telemetry       TEXT,
    UNIQUE (tenant_id, hardware_id),
    UNIQUE (tenant_id, key_fingerprint)
);

CREATE TABLE commands (
    id           TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices(id),
    kind         TEXT NOT NULL,
    args         TEXT NOT NULL DEFAULT 'null',
    state        TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'succeeded', 'failed')),
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT,
    deliveries   BIGINT NOT NULL DEFAULT 0,
    completed_at BIGINT,
    output       TEXT
);
-- The heartbeat path asks "what is open for this device?" on every beat: keep it an index probe.
CREATE INDEX commands_open ON commands(device_id, created_at) WHERE state IN ('queued', 'delivered');
CREATE INDEX commands_device ON commands(device_id, created_at);

CREATE TABLE audit_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id  TEXT,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_tenant ON audit_events(tenant_id, at);

-- Secrets shared by every replica (the device-token HMAC key), created on first start.
CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
