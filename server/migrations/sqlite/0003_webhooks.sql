-- Webhooks: subscriptions per tenant, and one delivery row per (event, webhook) with its
-- attempts. Kept identical to the other backend's migration of the same number.

CREATE TABLE webhooks (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    url          TEXT NOT NULL,
    -- HMAC-SHA256 key of the signatures; shown once at creation.
    secret       TEXT NOT NULL,
    -- `*`, or the event kinds between commas: `,device.offline,deployment.finished,`.
    events       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    deleted_at   BIGINT
);
CREATE INDEX webhooks_tenant ON webhooks(tenant_id);

CREATE TABLE webhook_deliveries (
    -- `<event id>:<webhook id>`: enqueueing the same event twice is impossible by construction.
    id              TEXT PRIMARY KEY,
    webhook_id      TEXT NOT NULL REFERENCES webhooks(id),
    event_id        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    -- `pending`, `delivered` or `failed` (gave up).
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    -- A replica sending it owns it until then.
    claimed_until   BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_attempt_at);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries(webhook_id, created_at);

-- When the offline sweep announced the device offline; cleared when it announces it back.
ALTER TABLE devices ADD COLUMN offline_since BIGINT;
