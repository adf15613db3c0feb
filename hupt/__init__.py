"""hupt: zero-downtime restarts for any unmodified Linux server, static binaries included."""
