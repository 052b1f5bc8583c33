"""The `redmap` console command: `demo`, and `migrate ...` (migrations); the only printer.

`redmap demo` is a short guided tour on the default engine (the embedded server
unless `REDMAP_URL` or `--url` names another).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .exc import RedmapError

__all__ = ["main"]


def _demo(url: str | None) -> int:
    import multiprocessing  # noqa: F401 - keeps the import cost out of other commands

    from .demo import run_demo

    run_demo(url, out=print)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `redmap` console script."""
    parser = argparse.ArgumentParser(
        prog="redmap", description="redmap: an object mapper for Redis"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short tour: models, commit, reload, conflict and retry")
    demo.add_argument("--url", help="Redis URL (default: REDMAP_URL, else an embedded server)")
    migrate = sub.add_parser(
        "migrate", help="versioned migrations of the key layout", add_help=False
    )
    migrate.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args.url)
        if args.command == "migrate":
            from .migrate.cli import main as migrate_main

            code: int = migrate_main(args.rest)
            return code
    except RedmapError as exc:
        print(f"redmap: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
