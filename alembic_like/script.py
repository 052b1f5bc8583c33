"""Revision files on disk; owns `ScriptDirectory`: reading `versions/*.py` into a
`RevisionMap` and writing new revision files from the template.

Called by `command` (every subcommand that needs the graph, `revision`, `merge`)
and, through the map it builds, by `runtime`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
import string
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from alembic_like.config import Config
from alembic_like.exc import CommandError, RevisionError
from alembic_like.revision import Revision, RevisionMap

__all__ = [
    "DEFAULT_TEMPLATE_VARS",
    "TEMPLATE_NAME",
    "ScriptDirectory",
    "default_template",
    "slugify",
]

#: The template's file name inside a migrations directory (copied there by `init`).
TEMPLATE_NAME = "script.py.tmpl"
#: Values for the host-specific placeholders, used when nobody filled them in.
DEFAULT_TEMPLATE_VARS: Mapping[str, str] = {
    "op_import": "from alembic_like.operations import Operations",
    "op_type": "Operations",
}
_SLUG_LENGTH = 40
_WORD = re.compile(r"\w+")


def default_template() -> str:
    """The text of the packaged `templates/revision.py.tmpl`."""
    files = importlib.resources.files("alembic_like")
    return (files / "templates" / "revision.py.tmpl").read_text(encoding="utf-8")


def slugify(message: str, length: int = _SLUG_LENGTH) -> str:
    """Lower-case words of `message` joined by `_`, cut at a word boundary near `length`."""
    slug = "_".join(_WORD.findall(message)).lower()
    if len(slug) > length:
        cut = slug[:length]
        slug = cut.rsplit("_", 1)[0] if "_" in cut else cut
    return slug


class ScriptDirectory:
    """A migrations directory: `versions/` with one file per revision, and a template.

    A revision file defines `revision` (str), `down_revision` (None, a str or a tuple
    of str), `upgrade(op)` and `downgrade(op)`; the first paragraph of its docstring
    is the message. Files are imported with importlib when `revision_map` is first
    read; modules are not added to `sys.modules`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map: RevisionMap | None = None

    @classmethod
    def from_config(cls, config: Config) -> ScriptDirectory:
        """The directory named by `config`; raises `CommandError` when it does not exist."""
        path = config.migrations_dir
        if not (path / "versions").is_dir():
            raise CommandError(
                f"No migrations directory at {path} (with a versions/ folder); run init first"
            )
        return cls(path)

    @property
    def versions_dir(self) -> Path:
        """Where revision files live."""
        return self.path / "versions"

    @property
    def revision_map(self) -> RevisionMap:
        """The graph of every revision file, loaded on first use."""
        if self._map is None:
            self._map = RevisionMap(self._load_file(p) for p in self._revision_files())
        return self._map

    def _revision_files(self) -> list[Path]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p for p in self.versions_dir.glob("*.py") if not p.name.startswith(("_", "."))
        )

    def _load_file(self, path: Path) -> Revision:
        module_name = "_alembic_like_revision_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise CommandError(f"Could not load revision file {path}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise CommandError(f"Could not load revision file {path}: {exc}") from exc
        rev = getattr(module, "revision", None)
        if not isinstance(rev, str):
            raise CommandError(f"{path} is not a revision file: it sets no `revision` string")
        down = getattr(module, "down_revision", None)
        if isinstance(down, list):
            down = tuple(down)
        valid_down = down is None or isinstance(down, str)
        if isinstance(down, tuple):
            valid_down = all(isinstance(d, str) for d in down)
        if not valid_down:
            raise CommandError(
                f"{path}: down_revision must be None, a string or a tuple of strings, got {down!r}"
            )
        for name in ("upgrade", "downgrade"):
            if not callable(getattr(module, name, None)):
                raise CommandError(f"{path}: revision {rev} defines no {name}(op) function")
        doc = (module.__doc__ or "").strip()
        return Revision(
            revision=rev,
            down_revision=down,
            message=doc.split("\n\n", 1)[0].strip(),
            path=path,
            module=module,
        )

    def template_text(self) -> str:
        """This directory's `script.py.tmpl`, or the packaged template when it has none."""
        own = self.path / TEMPLATE_NAME
        return own.read_text(encoding="utf-8") if own.is_file() else default_template()

    def generate_revision(
        self,
        message: str,
        head: str | Sequence[str] = "head",
        *,
        splice: bool = False,
        body_upgrade: str = "pass",
        body_downgrade: str = "pass",
        imports: Iterable[str] = (),
        rev_id: str | None = None,
        template_vars: Mapping[str, str] | None = None,
    ) -> Revision:
        """Write a new revision file on top of `head` and return it, loaded back.

        `head` is `head` (the single head; base when there are no revisions yet),
        `base` (a new root), a revision, or several targets (`heads`, a list of ids)
        for a merge revision. A parent that is not a head is refused unless `splice`,
        as a new branch from the middle of history is usually a mistake. The id is
        `rev_id` or 12 hex digits from uuid4; the file is `<id>_<slug>.py`.
        """
        rmap = self.revision_map
        import_lines = "".join(f"\n{line}" for line in imports)
        specs = [head] if isinstance(head, str) else list(head)
        parents = rmap.normalize_heads(rid for spec in specs for rid in rmap.resolve(spec))
        if not splice:
            for parent in parents:
                if parent not in rmap.heads:
                    raise CommandError(
                        f"Revision {parent} is not a head revision; use splice"
                        " (--splice) to create a new branch from it"
                    )
        rev = rev_id if rev_id is not None else self._new_id(rmap)
        if rev in rmap:
            raise RevisionError(f"Revision {rev} is already present")
        Revision(rev, parents or None)  # validates the id before anything is written
        down: str | tuple[str, ...] | None = (
            None if not parents else parents[0] if len(parents) == 1 else parents
        )
        values = {
            **DEFAULT_TEMPLATE_VARS,
            **(template_vars or {}),
            "message": _docstring_text(message),
            "up_revision": rev,
            "up_revision_repr": _literal(rev),
            "down_revision": ", ".join(parents) or "<base>",
            "down_revision_repr": _literal(down),
            "create_date": datetime.now().astimezone().isoformat(" ", "seconds"),
            "imports": import_lines + "\n" if import_lines else "",
            "upgrades": _indent(body_upgrade),
            "downgrades": _indent(body_downgrade),
        }
        try:
            text = string.Template(self.template_text()).substitute(values)
        except (KeyError, ValueError) as exc:
            raise CommandError(f"Bad placeholder in the revision template: {exc}") from exc
        slug = slugify(message)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        path = self.versions_dir / f"{rev}_{slug}.py"
        with path.open("x", encoding="utf-8") as file:
            file.write(text)
        self._map = None
        return self.revision_map.get_revision(rev)

    @staticmethod
    def _new_id(rmap: RevisionMap) -> str:
        while True:
            rev = uuid.uuid4().hex[-12:]
            if rev not in rmap:
                return rev


def _literal(value: str | tuple[str, ...] | None) -> str:
    """Python source for `value`, with double quotes as formatters write them."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    if isinstance(value, str) and value.isprintable() and not set(value) & {'"', "\\"}:
        return f'"{value}"'
    return repr(value)


def _docstring_text(message: str) -> str:
    return message.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _indent(body: str) -> str:
    lines = body.strip("\n").splitlines() or ["pass"]
    return "\n".join([lines[0]] + [f"    {line}" if line.strip() else "" for line in lines[1:]])
