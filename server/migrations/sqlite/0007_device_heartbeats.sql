-- A device's liveness apart from its identity. A heartbeat rewrites this narrow row (about 300
-- bytes of telemetry) instead of the device's whole row with its 800-byte public key and its
-- facts: more rows share a page, a batch of beats dirties fewer pages, the WAL carries less, and
-- the offline sweep scans less. One row per device, written in the same transaction as the device.
-- No rowid: the heartbeat looks its row up by device id, once.
CREATE TABLE device_heartbeats (
    device_id      TEXT PRIMARY KEY REFERENCES devices(id),
    last_heartbeat BIGINT,
    interval_s     BIGINT,
    agent_version  TEXT,
    telemetry      TEXT,
    -- When the offline sweep announced the device offline; cleared when it announces it back.
    offline_since  BIGINT
) WITHOUT ROWID;

INSERT INTO device_heartbeats (device_id, last_heartbeat, interval_s, agent_version, telemetry, offline_since)
    SELECT id, last_heartbeat, interval_s, agent_version, telemetry, offline_since FROM devices;

DROP INDEX devices_offline_since;
ALTER TABLE devices DROP COLUMN last_heartbeat;
ALTER TABLE devices DROP COLUMN interval_s;
ALTER TABLE devices DROP COLUMN agent_version;
ALTER TABLE devices DROP COLUMN telemetry;
ALTER TABLE devices DROP COLUMN offline_since;

-- The sweep's "back online" pass looks only at devices announced offline.
CREATE INDEX device_heartbeats_offline_since ON device_heartbeats(offline_since)
    WHERE offline_since IS NOT NULL;
-- Deregistered devices are few: a heartbeat (and the sweep) asks this small index whether its
-- device is one, instead of reading the device's row.
CREATE INDEX devices_deregistered ON devices(id) WHERE deregistered_at IS NOT NULL;
