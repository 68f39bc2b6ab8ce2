"""Ingestion: file feeds, backfill into ClickHouse, and the tick archiver."""
