"""One function per subcommand; owns what each command does and prints.

Called by `cli`, which builds its parser from these signatures (the first docstring
line is the help), and by hosts driving migrations from Python. Each takes the
`Config` first; those that touch the database take the host `Environment` next.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alembic_like.config import Config, add_table
from alembic_like.environment import Environment
from alembic_like.exc import CommandError
from alembic_like.messaging import obfuscate_url_pw
from alembic_like.revision import MigrationStep, Revision, RevisionMap
from alembic_like.runtime import MigrationContext
from alembic_like.script import (
    DEFAULT_TEMPLATE_VARS,
    TEMPLATE_NAME,
    ScriptDirectory,
    default_template,
)

__all__ = [
    "COMMANDS",
    "check",
    "current",
    "downgrade",
    "heads",
    "history",
    "init",
    "merge",
    "revision",
    "stamp",
    "upgrade",
]

#: The body written as downgrade() of new revisions: undo upgrade()'s operations.
FREE_DOWNGRADE = "op.reverse_of(upgrade)"


def init(
    config: Config,
    directory: str | None = None,
    template_vars: Mapping[str, str] | None = None,
) -> Path:
    """Create a migrations directory and the [tool.<name>] table in pyproject.toml.

    `directory` defaults to the configured `migrations`. `template_vars` fill the
    host's placeholders of the copied revision template (`op_import`, `op_type`)
    and may give `url` and `models` for the table (else the config's are used).
    """
    values = dict(template_vars or {})
    name = directory or config.migrations
    target = config.root / name
    if target.exists() and any(target.iterdir()):
        raise CommandError(f"Directory {target} already exists and is not empty")
    versions = target / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    config.messaging.msg(f"Creating directory {versions}")
    template = string.Template(default_template())
    (target / TEMPLATE_NAME).write_text(
        template.safe_substitute({**DEFAULT_TEMPLATE_VARS, **values}), encoding="utf-8"
    )
    config.messaging.msg(f"Generating {target / TEMPLATE_NAME}")
    table = {
        key: value
        for key, value in (
            ("url", values.get("url", config.url)),
            ("models", values.get("models", config.models)),
            ("migrations", name),
        )
        if value
    }
    if add_table(config.path, config.name, table):
        config.messaging.msg(f"Adding [tool.{config.name}] to {config.path}")
    else:
        config.messaging.msg(f"{config.path} already has [tool.{config.name}]; left as it is")
    config.migrations = name
    return target


def revision(
    config: Config,
    host: Environment | None = None,
    message: str = "",
    autogenerate: bool = False,
    head: str = "head",
    splice: bool = False,
    rev_id: str | None = None,
) -> Revision:
    """Create a new revision file.

    With `autogenerate`, the host compares the models with the schema recorded at
    head and writes the operations; the database must be at head. The downgrade
    written is `op.reverse_of(upgrade)`, the reverse of the upgrade's operations.
    """
    script = ScriptDirectory.from_config(config)
    body: list[str] = []
    imports: list[str] = []
    if autogenerate:
        if host is None:
            raise CommandError("autogenerate needs a database to compare with")
        at = set(host.version_store().get_heads())
        if at != set(script.revision_map.heads):
            raise CommandError("Target database is not up to date; upgrade it to head first")
        body = host.compare()
        imports = host.render_imports()
        if not body:
            config.messaging.msg("No changes in schema detected")
    rev = script.generate_revision(
        message,
        head,
        splice=splice,
        body_upgrade="\n".join(body) or "pass",
        body_downgrade=FREE_DOWNGRADE,
        imports=imports,
        rev_id=rev_id,
    )
    config.messaging.msg(f"Generating {rev.path} ... done")
    return rev


def merge(
    config: Config,
    revisions: Sequence[str] = ("heads",),
    message: str = "",
    rev_id: str | None = None,
) -> Revision:
    """Create a merge revision joining two or more heads into one."""
    script = ScriptDirectory.from_config(config)
    rmap = script.revision_map
    parents = rmap.normalize_heads(rid for spec in revisions for rid in rmap.resolve(spec))
    if len(parents) < 2:
        raise CommandError(f"Nothing to merge: {', '.join(parents) or '<base>'} is one head")
    rev = script.generate_revision(message or f"merge {', '.join(parents)}", parents, rev_id=rev_id)
    config.messaging.msg(f"Generating {rev.path} ... done")
    return rev


def upgrade(
    config: Config, host: Environment, target: str = "head", dry_run: bool = False
) -> list[MigrationStep]:
    """Upgrade the database to a later revision (default: head)."""
    context = _context(config, host)
    steps = context.upgrade(target, dry_run=dry_run)
    if not steps:
        config.messaging.msg(f"Nothing to upgrade; at {_heads_text(context.current())}")
    elif not dry_run:
        host.record_snapshot(context.current())
    return steps


def downgrade(
    config: Config, host: Environment, target: str, dry_run: bool = False
) -> list[MigrationStep]:
    """Revert the database to an earlier revision (a revision, -N or base)."""
    context = _context(config, host)
    steps = context.downgrade(target, dry_run=dry_run)
    if not steps:
        config.messaging.msg(f"Nothing to downgrade; at {_heads_text(context.current())}")
    return steps


def current(config: Config, host: Environment) -> tuple[str, ...]:
    """Show the revision(s) the database is at."""
    rmap = ScriptDirectory.from_config(config).revision_map
    at = tuple(host.version_store().get_heads())
    if config.url:
        config.messaging.msg(f"Current revision(s) for {obfuscate_url_pw(config.url)}:")
    for rid in at:
        tag = " (head)" if rid in rmap.heads else "" if rid in rmap else " (unknown revision)"
        config.messaging.msg(f"{rid}{tag}")
    if not at:
        config.messaging.msg("<base>")
    return at


def history(config: Config) -> list[Revision]:
    """List the revisions, newest first."""
    rmap = ScriptDirectory.from_config(config).revision_map
    revisions = list(rmap.iterate_revisions("heads", "base"))
    for rev in revisions:
        config.messaging.msg(_log_line(rmap, rev))
    return revisions


def heads(config: Config) -> tuple[str, ...]:
    """Show the head revision(s) of the migrations directory."""
    rmap = ScriptDirectory.from_config(config).revision_map
    for rid in rmap.heads:
        config.messaging.msg(f"{rid} (head)")
    return rmap.heads


def stamp(config: Config, host: Environment, target: str, purge: bool = False) -> tuple[str, ...]:
    """Set the database's revision without running any migration."""
    at = _context(config, host).stamp(target, purge=purge)
    host.record_snapshot(at)
    return at


def check(config: Config, host: Environment) -> int:
    """Exit non-zero when the database is not at head or the models differ from head."""
    rmap = ScriptDirectory.from_config(config).revision_map
    at = tuple(host.version_store().get_heads())
    if set(at) != set(rmap.heads):
        config.messaging.err(
            f"Database is not up to date: at {_heads_text(at)}, head is {_heads_text(rmap.heads)}"
        )
        return 1
    changes = host.compare()
    if changes:
        config.messaging.err("New upgrade operations detected:")
        for line in changes:
            config.messaging.err(f"    {line}")
        return 1
    config.messaging.msg("No new upgrade operations detected.")
    return 0


#: Subcommand name -> function, in the order the CLI lists them.
COMMANDS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (init, revision, merge, upgrade, downgrade, current, history, heads, stamp, check)
}


def _context(config: Config, host: Environment) -> MigrationContext:
    return MigrationContext(
        ScriptDirectory.from_config(config),
        host.version_store(),
        host.operations,
        config.messaging,
    )


def _heads_text(ids: Sequence[str]) -> str:
    return ", ".join(ids) or "<base>"


def _log_line(rmap: RevisionMap, rev: Revision) -> str:
    tags = []
    if rev.revision in rmap.heads:
        tags.append("head")
    if len(rmap.children(rev.revision)) > 1:
        tags.append("branchpoint")
    if rev.is_merge:
        tags.append("mergepoint")
    shown = rev.revision + (f" ({', '.join(tags)})" if tags else "")
    line = f"{_heads_text(rev.down_revisions)} -> {shown}"
    return f"{line}, {rev.message}" if rev.message else line
