-- The drainer claims ready rows in id order: this index lets it walk them in that order
-- and stop at its LIMIT, instead of sorting every pending row on every claim.
CREATE INDEX deliveries_state_id ON deliveries (state, id);
