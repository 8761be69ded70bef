-- Heartbeats are appended here and folded into `device_heartbeats` in bulk by the heartbeat
-- writer (server/src/heartbeat/sqlite.rs) within seconds. Devices beat in no order, so
-- updating each beat's row dirtied one 4 KiB page per beat, written whole to the WAL within the
-- commit the beat waits for; appended rows share pages, and the fold writes each page it touches
-- once for all the beats it carries. Only the writer writes this table, and the fold empties it.
-- AUTOINCREMENT: a row's seq is never reused, even once the log is empty, so deleting the rows up
-- to a fold's newest never deletes a beat logged after it.
CREATE TABLE heartbeat_log (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id     TEXT NOT NULL,
    at            BIGINT NOT NULL,
    interval_s    BIGINT NOT NULL,
    agent_version TEXT NOT NULL,
    telemetry     TEXT NOT NULL
);
