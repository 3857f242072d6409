"""Everything that runs inside a worker. Never imports `orchestrator` or `docker`."""
