"""`leadstream` — one console script for every role (stack, migrate, worker, sink, api, demo, bench)."""

from __future__ import annotations

import argparse
import sys

from leadstream.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leadstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="local Kafka + ClickHouse + Redis as plain processes")
    stack.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "stack":
        from leadstream.stack import main_stack

        return main_stack(args.action, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
