-- Bundles, the publisher keys that sign them, deployments and their per-device state.
-- Kept identical to the PostgreSQL migration of the same number (portable types only).

ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';

CREATE TABLE publisher_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    fingerprint TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    UNIQUE (tenant_id, fingerprint)
);

CREATE TABLE bundles (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    size          BIGINT NOT NULL,
    archive_bytes BIGINT NOT NULL,
    manifest      TEXT NOT NULL,
    publisher     TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    deleted_at    BIGINT,
    UNIQUE (tenant_id, name, version)
);
CREATE INDEX bundles_name ON bundles(tenant_id, name, created_at);

CREATE TABLE deployments (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id),
    bundle_id         TEXT NOT NULL REFERENCES bundles(id),
    state             TEXT NOT NULL CHECK (state IN ('running', 'paused', 'succeeded', 'halted', 'cancelled')),
    phases            TEXT NOT NULL,
    current_phase     BIGINT NOT NULL DEFAULT 0,
    success_threshold DOUBLE PRECISION NOT NULL,
    error_threshold   DOUBLE PRECISION NOT NULL,
    max_in_flight     BIGINT NOT NULL,
    allow_downgrade   BIGINT NOT NULL DEFAULT 0,
    rollback_of       TEXT,
    message           TEXT NOT NULL DEFAULT '',
    created_by        TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    finished_at       BIGINT
);
CREATE INDEX deployments_active ON deployments(state) WHERE state IN ('running', 'paused');
CREATE INDEX deployments_tenant ON deployments(tenant_id, created_at);

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments(id),
    device_id     TEXT NOT NULL REFERENCES devices(id),
    phase         BIGINT NOT NULL,
    position      BIGINT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'queued', 'downloading', 'verifying', 'installing',
                      'health-checking', 'succeeded', 'failed', 'rolled-back', 'cancelled')),
    command_id    TEXT,
    message       TEXT NOT NULL DEFAULT '',
    log_tail      TEXT NOT NULL DEFAULT '',
    history       TEXT NOT NULL DEFAULT '[]',
    updated_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_device ON deployment_devices(device_id);
