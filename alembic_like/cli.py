"""The command line; owns argument parsing and exit codes, built from `command.COMMANDS`.

Called by hosts' console entry points (`redmap migrate ...` calls `main` with its
host factory). Each subcommand's help is the first line of its function's docstring
and its arguments come from the function's signature.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from alembic_like.command import COMMANDS
from alembic_like.config import Config
from alembic_like.environment import HostFactory
from alembic_like.exc import AlembicLikeError, CommandError
from alembic_like.messaging import DEFAULT_LINE_INTERVAL, Messaging

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


# What `--help` says about a command when its docstring's later paragraphs are written
# for programmers; `{table}` is the `[tool.<name>]` table.
_DESCRIPTIONS = {
    "init": (
        "Create the migrations folder (versions/ and the revision template) and add a "
        "{table} table to pyproject.toml (with the --url given, if any); then set its "
        "models line."
    ),
    "revision": (
        "Create a new revision file in versions/.\n\nWith --autogenerate, the operations "
        "that take the layout recorded at head to the models' layout are written into it "
        "(the database must be at head), and its downgrade is their reverse."
    ),
}
_DESCRIPTION = (
    "Versioned migrations of the stored data: each revision file in versions/ changes the "
    "data one step (upgrade) and back (downgrade); the database records the revisions it "
    "is at."
)


def build_parser(
    prog: str = "alembic_like", name: str | None = None, *, url_help: str | None = None
) -> argparse.ArgumentParser:
    """The parser: global options, then one subparser per command.

    `name` is the `[tool.<name>]` table (default: `prog`), named in the help texts.
    """
    table = f"[tool.{name or prog}]"
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    parser.add_argument(
        "-c",
        "--config",
        default="pyproject.toml",
        help=f"the pyproject.toml holding the {table} table (default: ./pyproject.toml)",
    )
    parser.add_argument(
        "--url", default=None, help=url_help or f"the database URL (default: {table} url)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, fn in COMMANDS.items():
        doc = (inspect.getdoc(fn) or command).replace("[tool.<name>]", table)
        summary = doc.splitlines()[0]
        sub = subparsers.add_parser(
            command,
            help=summary,
            description=_wrap(_DESCRIPTIONS.get(command, summary).format(table=table)),
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


def _wrap(text: str, width: int = 80) -> str:
    """Each paragraph filled to `width`: the raw formatter keeps the blank lines only."""
    return "\n\n".join(textwrap.fill(part, width) for part in text.split("\n\n"))


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
    url_help: str | None = None,
    line_interval: float = DEFAULT_LINE_INTERVAL,
    error_prefix: str = "ERROR: ",
) -> int:
    """Run one command line; returns the exit code.

    `name` is the `[tool.<name>]` table to read (default: `prog`). Errors of
    alembic_like print as one `ERROR: ...` line (`error_prefix`) on stderr and give exit
    code 1; `check`
    gives its own code. Commands that touch the database get `host_factory(config)`.
    `line_interval` is the seconds between progress lines off a terminal.
    """
    parser = build_parser(prog, name, url_help=url_help)
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse has printed usage or help already
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    messaging = Messaging(quiet=args.quiet, line_interval=line_interval)
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
        messaging.err(f"{error_prefix}{exc}")
        return 1
    except KeyboardInterrupt:
        messaging.err("Interrupted; run the same command again to continue")
        return 130
    return result if isinstance(result, int) else 0
