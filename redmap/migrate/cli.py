"""`redmap migrate ...`: alembic_like's command line with redmap's environment; owns `main`.

Called by `redmap.cli` with the arguments after `migrate`. Besides handing over to
`alembic_like.cli.main`, it (1) takes the URL from `REDMAP_URL` when `--url` is not
given (then `[tool.redmap] url`, then the project's embedded server, as every `redmap`
command), (2) accepts `--url`/`-c` after the subcommand too, (3) runs `init` with
redmap's revision template, (4) sets the seconds between progress lines off a terminal
from `REDMAP_PROGRESS_EVERY`, and (5) is the one place where errors become messages:
alembic_like errors as `MigrationError` (`migration_errors`), every `RedmapError` as
one `redmap: error: ...` line with exit code 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from alembic_like import command
from alembic_like.cli import build_parser
from alembic_like.cli import main as alembic_main
from alembic_like.config import Config
from alembic_like.exc import AlembicLikeError
from alembic_like.messaging import DEFAULT_LINE_INTERVAL, Messaging

from ..cli import ERROR_PREFIX
from ..exc import MigrationError, RedmapError
from .env import RedisEnvironment

__all__ = [
    "NAME",
    "PROG",
    "PROGRESS_ENV",
    "TEMPLATE_VARS",
    "URL_ENV",
    "main",
    "migration_errors",
]

PROG = "redmap migrate"
NAME = "redmap"  # the [tool.redmap] table
URL_ENV = "REDMAP_URL"
#: Fill the revision template so revisions are typed against redmap's `op`.
TEMPLATE_VARS = {
    "op_import": "from redmap.migrate import RedisOperations",
    "op_type": "RedisOperations",
}
PROGRESS_ENV = "REDMAP_PROGRESS_EVERY"
URL_HELP = (
    "the Redis URL (default: $REDMAP_URL, else [tool.redmap] url, else the embedded server "
    "in the project folder's .redmap/)"
)
# Global options taking a value, which may also be written after the subcommand.
_GLOBAL_VALUED = ("--url", "-c", "--config")


def _line_interval() -> float:
    """Seconds between progress lines off a terminal (`REDMAP_PROGRESS_EVERY`, default 30)."""
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None:
        return DEFAULT_LINE_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise MigrationError(f"{PROGRESS_ENV} must be a number of seconds (0 or more), not {raw!r}")
    return value


@contextmanager
def migration_errors() -> Iterator[None]:
    """Raise alembic_like's errors as `MigrationError`, message kept and cause chained."""
    try:
        yield
    except AlembicLikeError as exc:
        raise MigrationError(str(exc)) from exc


def _hoist_globals(argv: list[str]) -> list[str]:
    """Move `--url X` and `-c X` written after the subcommand to the front, for argparse."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _GLOBAL_VALUED else 1
    head, rest, moved = argv[: i + 1], argv[i + 1 :], []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg in _GLOBAL_VALUED and j + 1 < len(rest):
            moved += rest[j : j + 2]
            j += 2
        elif arg.startswith(("--url=", "--config=")):
            moved.append(arg)
            j += 1
        else:
            head.append(arg)
            j += 1
    return moved + head


def main(argv: Sequence[str] | None = None) -> int:
    """Run `redmap migrate` with `argv` (the words after `migrate`); returns the exit code."""
    args = _hoist_globals(list(sys.argv[1:] if argv is None else argv))
    try:
        parsed = build_parser(PROG, NAME, url_help=URL_HELP).parse_args(args)
    except SystemExit as exc:  # usage or --help, printed by argparse already
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        line_interval = _line_interval()
    except RedmapError as exc:
        Messaging().err(f"{ERROR_PREFIX}{exc}")
        return 1
    if parsed.command == "init":
        return _init(parsed.config, parsed.url, parsed.directory, quiet=parsed.quiet)
    if parsed.url is None and os.environ.get(URL_ENV):
        args = ["--url", os.environ[URL_ENV], *args]
    hosts: list[RedisEnvironment] = []

    def host_factory(config: Config) -> RedisEnvironment:
        host = RedisEnvironment(config, dry_run=bool(getattr(parsed, "dry_run", False)))
        hosts.append(host)
        return host

    try:
        return alembic_main(
            args,
            host_factory,
            prog=PROG,
            name=NAME,
            url_help=URL_HELP,
            line_interval=line_interval,
            error_prefix=ERROR_PREFIX,
        )
    except RedmapError as exc:
        Messaging().err(f"{ERROR_PREFIX}{exc}")
        return 1
    finally:
        for host in hosts:
            host.close()


def _init(config_path: str, url: str | None, directory: str | None, *, quiet: bool) -> int:
    """`init` with redmap's template values (the URL is written only when given by --url)."""
    messaging = Messaging(quiet=quiet)
    try:
        with migration_errors():
            config = Config.load(config_path, NAME, url=url, messaging=messaging)
            command.init(config, directory, template_vars=TEMPLATE_VARS)
    except RedmapError as exc:
        messaging.err(f"{ERROR_PREFIX}{exc}")
        return 1
    if not config.models:
        messaging.msg(
            f'Next: set models = "package.module:registry" in [tool.{NAME}] of {config.path}'
        )
    return 0
