"""Tests for `redmap.migrate.cli` and `env`: every subcommand through the real `redmap` CLI."""

from __future__ import annotations

import redmap
from alembic_like.config import read_table
from redmap.testing.assertions import dump_keys

from .conftest import Project, stored

V1 = """\
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from redmap import Indexed, PrimaryKey, Unique, registry

reg = registry(prefix="app")


@reg.mapped
@dataclass
class Author:
    name: Annotated[str, Indexed()]
    fullname: str = ""
    id: Annotated[Optional[int], PrimaryKey()] = None
"""

# bio and score added (score indexed), fullname renamed to display (same type), name unique.
V2 = (
    V1.replace('    fullname: str = ""\n', '    display: str = ""\n    bio: str = "-"\n')
    .replace("name: Annotated[str, Indexed()]", "name: Annotated[str, Unique()]")
    .replace("    id:", "    score: Annotated[int, Indexed()] = 0\n    id:")
)


def seed(project: Project, n: int = 20) -> None:
    module = project.models()
    with redmap.Session(project.engine) as s:
        s.add_all(module.Author(name=f"n{i}", fullname=f"Full {i}") for i in range(n))
        s.commit()


def chain(project: Project) -> None:
    """Three revisions a1 <- b2 <- c3, each adding one field with a default."""
    for rev, down, name in (("a1", None, "x"), ("b2", "a1", "y"), ("c3", "b2", "z")):
        project.write_revision(rev, down, f'op.add_field("Author", "{name}", default="{rev}")')


def fields(project: Project) -> set[bytes]:
    """Hash fields present on every author."""
    keys = [k for k in project.client.scan_iter(match="{app}:author:[0-9]*")]
    return set.intersection(*(set(project.client.hkeys(k)) for k in keys))


class TestInit:
    def test_init_writes_directory_template_and_table(self, project: Project) -> None:
        """init creates migrations/, a template typed for redmap's op and [tool.redmap]."""
        (project.root / "pyproject.toml").write_text('[project]\nname = "demo"\n')
        url = "redis://user:pw@localhost:1/0"
        out = project.ok("init", "--url", url)  # --url after the subcommand is accepted
        assert "Next: set models" in out
        assert (project.root / "migrations" / "versions").is_dir()
        template = (project.root / "migrations" / "script.py.tmpl").read_text()
        assert "from redmap.migrate import RedisOperations" in template
        assert "def upgrade(op: RedisOperations) -> None:" in template
        table = read_table(project.root / "pyproject.toml", "redmap")
        assert table == {"url": url, "migrations": "migrations"}
        again = project.run("init")
        assert again.code == 1 and "already exists and is not empty" in again.err

    def test_revision_file_uses_the_template(self, project: Project) -> None:
        """revision -m writes a loadable file with the message, chained on the head."""
        project.write_models(V1)
        project.ok("init")
        project.ok("revision", "-m", "first step", "--rev-id", "aaa1")
        project.ok("revision", "-m", "second", "--rev-id", "bbb2")
        text = (project.root / "migrations/versions/bbb2_second.py").read_text()
        assert (
            '"""second' in text and 'down_revision: str | tuple[str, ...] | None = "aaa1"' in text
        )
        assert "op.reverse_of(upgrade)" in text
        assert project.ok("heads").split() == ["bbb2", "(head)"]


class TestLifecycle:
    def test_upgrade_downgrade_targets_current_history(self, project: Project) -> None:
        """upgrade +1 / REV / head and downgrade -1 / base move heads and data step by step."""
        project.write_models(V1)
        seed(project)
        chain(project)
        history = project.ok("history").splitlines()
        assert history == ["b2 -> c3 (head), c3", "a1 -> b2, b2", "<base> -> a1, a1"]
        assert "<base>" in project.ok("current")
        project.ok("upgrade", "+1")
        assert project.heads() == ["a1"] and b"x" in fields(project) and b"y" not in fields(project)
        project.ok("upgrade", "b2")
        assert project.heads() == ["b2"] and b"y" in fields(project) and b"z" not in fields(project)
        out = project.ok("upgrade", "head")
        assert "Running upgrade b2 -> c3" in out
        assert project.heads() == ["c3"] and {b"x", b"y", b"z"} <= fields(project)
        assert "c3 (head)" in project.ok("current")
        project.ok("downgrade", "-1")
        assert project.heads() == ["b2"] and b"z" not in fields(project)
        project.ok("downgrade", "base")
        assert project.heads() == [] and not {b"x", b"y"} & fields(project)
        assert "Nothing to downgrade" in project.ok("downgrade", "base")

    def test_stamp_sets_heads_without_running(self, project: Project) -> None:
        """stamp records the revision and the layout but changes no data."""
        project.write_models(V1)
        seed(project)
        chain(project)
        before = stored(project.client)
        assert "Stamped c3" in project.ok("stamp", "head")
        assert project.heads() == ["c3"]
        assert stored(project.client) == before
        assert project.run("check").code == 0
        project.ok("stamp", "a1")
        assert project.heads() == ["a1"]

    def test_check_exit_codes(self, project: Project) -> None:
        """check: 1 when behind, 0 at head and in sync, 1 when the models drifted."""
        project.write_models(V1)
        chain(project)
        behind = project.run("check")
        assert behind.code == 1 and "not up to date" in behind.err
        project.ok("upgrade", "head")
        assert project.run("check").code == 0
        project.write_models(V1.replace("    id:", "    bio: str = '-'\n    id:"))
        drifted = project.run("check")
        assert drifted.code == 1
        assert 'op.add_field("Author", "bio", default="-")' in drifted.err

    def test_autogenerate_writes_the_operations(self, project: Project) -> None:
        """--autogenerate diffs the models against the recorded layout, rename as a comment."""
        project.write_models(V1)
        project.ok("init")
        project.ok("revision", "--autogenerate", "-m", "initial", "--rev-id", "r1")
        text = (project.root / "migrations/versions/r1_initial.py").read_text()
        assert "# new model Author (keyspace 'author'): nothing to migrate\n    pass" in text
        project.ok("upgrade", "head")
        seed(project)
        project.write_models(V2)
        project.ok("revision", "--autogenerate", "-m", "second", "--rev-id", "r2")
        text = (project.root / "migrations/versions/r2_second.py").read_text()
        body = text[text.index("def upgrade") : text.index("def downgrade")]
        expected = [
            '# op.rename_field("Author", "fullname", "display")  # uncomment if this is a rename',
            '# op.rename_field("Author", "fullname", "bio")  # uncomment if this is a rename',
            'op.add_field("Author", "display", default="")',
            'op.add_field("Author", "bio", default="-")',
            'op.add_field("Author", "score", default=0)',
            'op.create_index("Author", "score", kind="indexed")',
            'op.drop_field("Author", "fullname", default="")',
            'op.drop_index("Author", "name", kind="indexed")',
            'op.create_index("Author", "name", kind="unique")',
        ]
        assert [line.strip() for line in body.splitlines()[1:] if line.strip()] == expected
        project.ok("upgrade", "head")
        assert project.run("check").code == 0
        module = project.models()
        with redmap.Session(project.engine) as s:
            found = s.scalars(redmap.select(module.Author).where(module.Author.score == 0)).all()
            assert len(found) == 20 and {a.bio for a in found} == {"-"}
        project.ok("downgrade", "-1")  # the written downgrade is the reverse of the upgrade
        assert {b"fullname", b"name"} <= fields(project) and b"bio" not in fields(project)


class TestOptions:
    def test_dry_run_prints_counts_and_writes_nothing(self, project: Project) -> None:
        """--dry-run lists each operation with what it would change, and changes nothing."""
        project.write_models(V1)
        seed(project)
        project.client.hdel("{app}:author:3", "fullname")
        project.write_revision(
            "r1",
            None,
            """
            op.add_field("Author", "bio", default="-")
            op.rename_field("Author", "fullname", "display")
            op.create_index("Author", "name", kind="unique")
            """,
        )
        before = dump_keys(project.client)
        out = project.ok("upgrade", "head", "--dry-run")
        assert "Would run upgrade <base> -> r1" in out
        assert "add_field Author.bio (default='-'): would set bio on 20 of 20 objects" in out
        assert "would move fullname in 19 of 20 objects and rename 0 index keys" in out
        assert "create_index Author.name (unique): would index 20 objects" in out
        assert dump_keys(project.client) == before
        assert project.heads() == []

    def test_quiet_prints_nothing(self, project: Project) -> None:
        """-q silences everything but errors."""
        project.write_models(V1)
        seed(project)
        chain(project)
        result = project.run("upgrade", "head", "-q")
        assert result.code == 0 and result.out == "" and result.err == ""
        assert project.heads() == ["c3"]

    def test_url_option_wins_and_errors_hide_the_password(self, project: Project) -> None:
        """--url beats REDMAP_URL; a connection failure is one ERROR line without the password."""
        project.write_models(V1)
        chain(project)
        result = project.run("current", "--url", "redis://me:s3cret@127.0.0.1:1/0")
        assert result.code == 1
        assert result.err.startswith("redmap: error: ") and "Traceback" not in result.err
        assert "s3cret" not in result.err and "127.0.0.1:1" in result.err

    def test_redmap_url_wins_over_the_table(self, project: Project) -> None:
        """REDMAP_URL overrides [tool.redmap] url (here unreachable)."""
        project.write_models(V1)
        with (project.root / "pyproject.toml").open("a") as f:
            f.write('url = "redis://127.0.0.1:1/0"\n')
        chain(project)
        out = project.ok("current")
        assert project.url in out and "<base>" in out

    def test_missing_models_setting_is_explained(self, project: Project) -> None:
        """autogenerate without [tool.redmap] models says which setting is missing."""
        (project.root / "pyproject.toml").write_text('[tool.redmap]\nprefix = "app"\n')
        project.ok("init")
        result = project.run("revision", "--autogenerate", "-m", "x")
        assert result.code == 1
        assert 'set models = "package.module:registry" in [tool.redmap]' in result.err

    def test_bad_models_setting_is_explained(self, project: Project) -> None:
        """A models setting naming something missing fails with one clear line."""
        (project.root / "pyproject.toml").write_text('[tool.redmap]\nmodels = "nowhere:reg"\n')
        chain(project)
        result = project.run("upgrade", "head")
        assert result.code == 1
        assert "cannot load the models 'nowhere:reg'" in result.err
