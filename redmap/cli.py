"""The `redmap` console command: `demo`, `audit`, `migrate ...`; the only printer.

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


def _audit(url: str | None, models: str) -> int:
    import importlib
    import os

    import redis

    from .audit import audit

    module_name, _, attr = models.partition(":")
    reg = getattr(importlib.import_module(module_name), attr or "reg")
    target = url or os.environ.get("REDMAP_URL")
    if not target:
        print("redmap: error: give --url or set REDMAP_URL", file=sys.stderr)
        return 2
    with redis.Redis.from_url(target) as client:
        report = audit(client, reg)
    for line in report.mismatches:
        print(f"mismatch: {line}")
    for key in report.unexplained:
        print(f"unexplained key: {key}")
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `redmap` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["migrate"]:
        # alembic_like's CLI parses everything after "migrate", options included.
        from .migrate.cli import main as migrate_main

        code: int = migrate_main(args_list[1:])
        return code
    parser = argparse.ArgumentParser(
        prog="redmap", description="redmap: an object mapper for Redis"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short tour: models, commit, reload, conflict and retry")
    demo.add_argument("--url", help="Redis URL (default: REDMAP_URL, else an embedded server)")
    aud = sub.add_parser(
        "audit", help="recompute every index and link from the objects and report differences"
    )
    aud.add_argument("--url", help="Redis URL (default: REDMAP_URL)")
    aud.add_argument("--models", required=True, help="the registry, as package.module:reg")
    migrate = sub.add_parser(
        "migrate", help="versioned migrations of the key layout", add_help=False
    )
    migrate.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(args_list)
    try:
        if args.command == "demo":
            return _demo(args.url)
        if args.command == "audit":
            return _audit(args.url, args.models)
    except RedmapError as exc:
        print(f"redmap: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
