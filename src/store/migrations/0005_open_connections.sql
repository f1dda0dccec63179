-- The open connection episodes (stored without an end), counted by `/v1/status` each time the
-- console refreshes: a partial index keeps that count to the open episodes alone, whatever the
-- size of the history.
CREATE INDEX connection_open_idx ON connection (person_id, peer_id) WHERE ended_at IS NULL;
