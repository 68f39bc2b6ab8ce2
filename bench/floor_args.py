"""The command line every echo floor takes (ours, stock aiokafka's, librdkafka's), one parser.

Its own module, importing nothing of tickserve: a floor we did not write must not load
our data plane to read its arguments.
"""

from __future__ import annotations

import argparse


def floor_parser(description: str | None) -> argparse.ArgumentParser:
    """Source and sink topics, the group, and the client settings all floors share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=20)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=2000)
    return parser
