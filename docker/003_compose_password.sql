-- docker/compose.yaml only: a known password for the relay's role, for local trial.
ALTER ROLE outbox_relay PASSWORD 'outbox_relay';
