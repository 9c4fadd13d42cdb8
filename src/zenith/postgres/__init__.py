"""Real PostgreSQL: key encoding of cluster contents (and, later, WAL decoding, base-backup
import, WAL streaming and export)."""
