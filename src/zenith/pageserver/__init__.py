"""The pageserver daemon: listens on the PostgreSQL wire protocol, authenticates users and
dispatches their commands to the repository (and, later, to transfer and postgres)."""
