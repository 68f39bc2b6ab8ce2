"""Readiness checks in a short-lived process: `python -m deploy.checks mlflow|clickhouse URL`."""

from __future__ import annotations

import sys


def check_mlflow(uri: str) -> None:
    """Create or migrate the tracking store and read it once."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def check_clickhouse(dsn: str) -> None:
    """Open the DSN, create the archive tables, run a query."""
    from stream.ingest.archive import ClickHouseArchive

    archive = ClickHouseArchive.open(dsn)
    archive.count_ticks()


def main(argv: list[str]) -> int:
    """Entry point; exits non-zero with the error on stderr."""
    what, url = argv
    if what == "mlflow":
        check_mlflow(url)
    elif what == "clickhouse":
        check_clickhouse(url)
    else:
        print(f"unknown check {what!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
