-- The device sweep's "back online" pass looks only at devices announced offline: a partial index
-- holds just those (it changes when a device is announced, never on a heartbeat). Kept identical
-- to the other backend's migration of the same number.
CREATE INDEX devices_offline_since ON devices(offline_since) WHERE offline_since IS NOT NULL;
