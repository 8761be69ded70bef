-- Audit events say where a change came from and what it changed. Kept identical to the other
-- backend's migration of the same number.

-- The client address of the request (`local` for the admin commands), and its request id.
ALTER TABLE audit_events ADD COLUMN source TEXT NOT NULL DEFAULT 'local';
ALTER TABLE audit_events ADD COLUMN request_id TEXT;
-- JSON of the changed fields before and after, for changes to existing objects.
ALTER TABLE audit_events ADD COLUMN before_state TEXT;
ALTER TABLE audit_events ADD COLUMN after_state TEXT;
CREATE INDEX audit_events_tenant_id ON audit_events(tenant_id, id);
