"""The `redmap` console command: `demo`, `audit`, `sweep`, `migrate ...`, `--version`.

Every subcommand finds its database and models the same way (`resolve_url`,
`resolve_models`): the `--url`/`--models` flags first, then `REDMAP_URL`, then the
`[tool.redmap]` table of the project's pyproject.toml (`-c`), and last the embedded
server of the project folder (`redis+embedded://<project>/.redmap`). Errors print as
one `redmap: error: ...` line, never a traceback, and exit 1 (2 for `audit`, whose 1
means "found something"). `redmap migrate` hands its words to
`redmap.migrate.cli`, which resolves the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .exc import RedmapError

__all__ = ["ERROR_PREFIX", "URL_ENV", "main", "resolve_models", "resolve_url"]

URL_ENV = "REDMAP_URL"
#: Every error of every subcommand is one line starting with this.
ERROR_PREFIX = "redmap: error: "
_DESCRIPTION = """\
redmap: an object mapper for Redis in the style of SQLAlchemy's ORM.

The database is the one named by --url, else by the REDMAP_URL environment variable,
else by `url` in the [tool.redmap] table of pyproject.toml, else the embedded Redis
server of the project folder (./.redmap/, started on demand). `redmap migrate --help`
lists the migration commands."""

_AUDIT_DESCRIPTION = """\
Recompute every index, unique key and relationship link from the stored objects and
report each difference, and each key under the models' prefix that nothing explains.
Read-only; it SCANs the prefix, so run it offline or at a quiet time.

Exit code: 0 when everything matches, 1 when something was reported, 2 on an error."""


def _project_table(config: str) -> tuple[Path, dict[str, object]]:
    """The pyproject.toml's folder and its `[tool.redmap]` table (empty when absent)."""
    from alembic_like.config import read_table
    from alembic_like.exc import AlembicLikeError

    path = Path(config)
    try:
        table = read_table(path, "redmap") or {}
    except AlembicLikeError as exc:
        raise RedmapError(str(exc)) from exc
    return path.parent, table


def resolve_url(flag: str | None, config: str = "pyproject.toml") -> str:
    """The database URL: `--url`, `REDMAP_URL`, `[tool.redmap] url`, the project's server."""
    if flag:
        return flag
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    root, table = _project_table(config)
    url = table.get("url")
    if url is not None:
        if not isinstance(url, str) or not url:
            raise RedmapError(f"{config}: [tool.redmap] url must be a non-empty string")
        return url
    return "redis+embedded://" + str((root / ".redmap").resolve())


def resolve_models(flag: str | None, config: str = "pyproject.toml") -> tuple[str, Path]:
    """The models spec (`--models`, else `[tool.redmap] models`) and the folder to import from."""
    root, table = _project_table(config)
    spec = flag or table.get("models")
    if not spec:
        raise RedmapError(
            "which models? give --models package.module:registry, or set "
            f'models = "package.module:registry" in [tool.redmap] of {config}'
        )
    if not isinstance(spec, str):
        raise RedmapError(f"{config}: [tool.redmap] models must be a string")
    return spec, root.resolve()


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(resolve_url(args.url, args.config), out=print)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit
    from .dialects.base import translate_errors
    from .engine import create_engine
    from .migrate.env import load_registry

    spec, root = resolve_models(args.models, args.config)
    reg = load_registry(spec, root)
    url = resolve_url(args.url, args.config)
    engine = create_engine(url)
    try:
        # The audit talks to redis-py's client directly, which does not re-send: start
        # once a restarted server has loaded its data set.
        engine.dialect.wait_until_loaded()
        with translate_errors(url):
            report = audit(engine.dialect.client, reg)
    finally:
        engine.dispose()
    for line in report.mismatches:
        print(f"mismatch: {line}")
    for key in report.unexplained:
        print(f"unexplained key: {key}")
    print(report.summary())
    return 0 if report.ok else 1


def _sweep(args: argparse.Namespace) -> int:
    from .engine import create_engine
    from .migrate.env import load_registry

    spec, root = resolve_models(args.models, args.config)
    reg = load_registry(spec, root)
    url = resolve_url(args.url, args.config)
    engine = create_engine(url)
    try:
        purged = engine.sweep(reg)
    finally:
        engine.dispose()
    print(f"swept {purged} expired or purged object(s)")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="Redis URL (default: $REDMAP_URL, else [tool.redmap] url, else the embedded "
        "server in ./.redmap/)",
    )
    parser.add_argument(
        "-c",
        "--config",
        default="pyproject.toml",
        help="the project's pyproject.toml, read for its [tool.redmap] table "
        "(default: ./pyproject.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (`migrate` is parsed by `redmap.migrate.cli`)."""
    parser = argparse.ArgumentParser(
        prog="redmap",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"redmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="a short tour: a model, commit, reload, query, conflict and retry",
        description="A short tour of redmap on your database: it prints the code of each "
        "step and what it did, under its own key prefix, and deletes its keys at the end.",
    )
    _add_common(demo)
    aud = sub.add_parser(
        "audit",
        help="check every index and link against the stored objects (read-only)",
        description=_AUDIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(aud)
    aud.add_argument(
        "--models",
        help="the models' registry as package.module:attribute, imported from the project "
        "folder (default: [tool.redmap] models)",
    )
    swp = sub.add_parser(
        "sweep",
        help="purge the objects whose ExpiresAt moment or soft-delete grace period passed",
        description="Remove every object whose deadline passed, with its index, unique "
        "and link entries, found through each model's deadline zset (no SCAN). Queries "
        "never need it to be correct; it gives memory back and leaves `redmap audit` "
        "clean. Safe to run at any time, also from cron.",
    )
    _add_common(swp)
    swp.add_argument(
        "--models",
        help="the models' registry as package.module:attribute, imported from the project "
        "folder (default: [tool.redmap] models)",
    )
    sub.add_parser(
        "migrate",
        help="versioned migrations of the stored data (redmap migrate --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `redmap` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["migrate"]:
        # alembic_like's CLI parses everything after "migrate", options included.
        from .migrate.cli import main as migrate_main

        code: int = migrate_main(args_list[1:])
        return code
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # usage, --help or --version, printed by argparse
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        if args.command == "sweep":
            return _sweep(args)
        return _demo(args) if args.command == "demo" else _audit(args)
    except RedmapError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2 if args.command == "audit" else 1
    except KeyboardInterrupt:
        print("redmap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
