"""hupt: zero-downtime restarts for any unmodified Linux server, static binaries included."""

__version__ = "0.1.0"
