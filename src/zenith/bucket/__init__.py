"""Origins in S3-compatible object storage (docs/s3.md)."""
