-- What the SQLite heartbeat writer remembers of devices (server/src/heartbeat/sqlite.rs, `Known`:
-- which devices are live, which may have open commands) holds until a change that could make it
-- wrong. These triggers count such changes, whoever makes them (the API, the CLI, another
-- process), and the writer reads the count in each batch's transaction. Commits that change
-- nothing it remembers (auth nonces, audit events, sessions, webhooks) leave it alone.
CREATE TABLE heartbeat_writer_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO heartbeat_writer_epoch (id, n) VALUES (1, 0);

CREATE TRIGGER device_deregistered_epoch AFTER UPDATE OF deregistered_at ON devices
BEGIN
    UPDATE heartbeat_writer_epoch SET n = n + 1;
END;
CREATE TRIGGER device_deleted_epoch AFTER DELETE ON devices
BEGIN
    UPDATE heartbeat_writer_epoch SET n = n + 1;
END;
CREATE TRIGGER heartbeat_row_deleted_epoch AFTER DELETE ON device_heartbeats
BEGIN
    UPDATE heartbeat_writer_epoch SET n = n + 1;
END;
CREATE TRIGGER command_queued_epoch AFTER INSERT ON commands
BEGIN
    UPDATE heartbeat_writer_epoch SET n = n + 1;
END;
CREATE TRIGGER command_reopened_epoch AFTER UPDATE OF state ON commands
    WHEN NEW.state IN ('queued', 'delivered') AND OLD.state NOT IN ('queued', 'delivered')
BEGIN
    UPDATE heartbeat_writer_epoch SET n = n + 1;
END;
