"""The command line; owns argument parsing and exit codes, built from `command.COMMANDS`.

Called by hosts' console entry points (`redmap migrate ...` calls `main` with its
host factory). Each subcommand's help is the first line of its function's docstring
and its arguments come from the function's signature.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from alembic_like.command import COMMANDS
from alembic_like.config import Config
from alembic_like.environment import HostFactory
from alembic_like.exc import AlembicLikeError, CommandError
from alembic_like.messaging import Messaging

__all__ = ["build_parser", "main"]

# Parameters filled by main() rather than by the user.
_INJECTED = frozenset({"config", "host", "template_vars"})
# Parameters with a default that are still given positionally (`upgrade [target]`).
_OPTIONAL_POSITIONALS = frozenset({"target", "directory", "revisions"})
_SHORT = {"message": "-m"}
_HELP = {
    "target": "revision: an id or unique prefix, head, heads, base, +N, -N, head-1, REV+N",
    "directory": "migrations directory, relative to the pyproject.toml",
    "revisions": "revisions to merge (default: heads)",
    "message": "message of the new revision (its docstring and file name)",
    "autogenerate": "write the operations that bring the recorded schema to the models",
    "head": "revision the new one is based on (head, base, or an id)",
    "splice": "allow basing the new revision on one that is not a head",
    "rev_id": "use this revision id instead of a generated one",
    "dry_run": "print the steps and their operations; change nothing",
    "purge": "replace all stored heads, even unknown ones",
}


def build_parser(prog: str = "alembic_like") -> argparse.ArgumentParser:
    """The parser: global options, then one subparser per command."""
    parser = argparse.ArgumentParser(prog=prog, description="Manage migrations.")
    parser.add_argument(
        "-c", "--config", default="pyproject.toml", help="pyproject.toml holding [tool.<name>]"
    )
    parser.add_argument("--url", default=None, help="database URL; overrides the config's")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or name
        sub = subparsers.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for param in inspect.signature(fn).parameters.values():
            if param.name not in _INJECTED:
                _add_argument(sub, param)
        # SUPPRESS keeps a subcommand's absent -q from overwriting a global one.
        sub.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print nothing but errors",
        )
    return parser


def _add_argument(parser: argparse.ArgumentParser, param: inspect.Parameter) -> None:
    help_text = _HELP.get(param.name)
    default = param.default
    if default is inspect.Parameter.empty:
        parser.add_argument(param.name, help=help_text)
    elif param.name in _OPTIONAL_POSITIONALS:
        nargs = "*" if isinstance(default, tuple) else "?"
        parser.add_argument(param.name, nargs=nargs, default=default, help=help_text)
    else:
        flags = [f"--{param.name.replace('_', '-')}"]
        if param.name in _SHORT:
            flags.insert(0, _SHORT[param.name])
        if isinstance(default, bool):
            parser.add_argument(*flags, action="store_true", help=help_text)
        else:
            parser.add_argument(*flags, default=default, help=help_text)


def main(
    argv: Sequence[str] | None = None,
    host_factory: HostFactory | None = None,
    *,
    prog: str = "alembic_like",
    name: str | None = None,
) -> int:
    """Run one command line; returns the exit code.

    `name` is the `[tool.<name>]` table to read (default: `prog`). Errors of
    alembic_like print as `ERROR: ...` on stderr and give exit code 1; `check`
    gives its own code. Commands that touch the database get `host_factory(config)`.
    """
    try:
        args = build_parser(prog).parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse has printed usage or help already
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    messaging = Messaging(quiet=args.quiet)
    fn: Callable[..., Any] = COMMANDS[args.command]
    params = inspect.signature(fn).parameters
    kwargs = {key: getattr(args, key) for key in params if key not in _INJECTED}
    try:
        config = Config.load(args.config, name or prog, url=args.url, messaging=messaging)
        if "host" in params:
            if host_factory is not None:
                kwargs["host"] = host_factory(config)
            elif params["host"].default is inspect.Parameter.empty:
                raise CommandError(f"{args.command} needs a database, and none is configured")
        result = fn(config, **kwargs)
    except AlembicLikeError as exc:
        messaging.err(f"ERROR: {exc}")
        return 1
    except KeyboardInterrupt:
        messaging.err("Interrupted; run the same command again to continue")
        return 130
    return result if isinstance(result, int) else 0
