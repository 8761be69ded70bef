-- A device's liveness apart from its identity. A heartbeat rewrites this narrow row (about 300
-- bytes of telemetry) instead of the device's whole row with its 800-byte public key and its
-- facts. No index covers a column a heartbeat writes, and the fill factor leaves room in each
-- page, so PostgreSQL updates the row in place (a HOT update: no index entries, the old version
-- pruned within the page) instead of writing a new row version and an entry in every index of
-- `devices`. One row per device, written in the same transaction as the device.
CREATE TABLE device_heartbeats (
    device_id      TEXT PRIMARY KEY REFERENCES devices(id),
    last_heartbeat BIGINT,
    interval_s     BIGINT,
    agent_version  TEXT,
    telemetry      TEXT,
    -- When the offline sweep announced the device offline; cleared when it announces it back.
    offline_since  BIGINT
) WITH (fillfactor = 50);

INSERT INTO device_heartbeats (device_id, last_heartbeat, interval_s, agent_version, telemetry, offline_since)
    SELECT id, last_heartbeat, interval_s, agent_version, telemetry, offline_since FROM devices;

DROP INDEX devices_offline_since;
ALTER TABLE devices DROP COLUMN last_heartbeat, DROP COLUMN interval_s, DROP COLUMN agent_version,
    DROP COLUMN telemetry, DROP COLUMN offline_since;

-- The sweep's "back online" pass looks only at devices announced offline.
CREATE INDEX device_heartbeats_offline_since ON device_heartbeats(offline_since)
    WHERE offline_since IS NOT NULL;
-- Deregistered devices are few: a heartbeat (and the sweep) asks this small index whether its
-- device is one, instead of reading the device's row.
CREATE INDEX devices_deregistered ON devices(id) WHERE deregistered_at IS NOT NULL;
