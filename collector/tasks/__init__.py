"""Thin Celery task shells: ingest (drain), rest (open interest, depth snapshots), alerts."""
