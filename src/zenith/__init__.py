"""zenith: a PostgreSQL pageserver with git-like push and pull of database branches."""

__version__ = "0.1.0"
