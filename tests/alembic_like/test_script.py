"""Tests for `alembic_like.script`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from alembic_like.config import Config
from alembic_like.exc import CommandError, MultipleHeads, RevisionError
from alembic_like.script import TEMPLATE_NAME, ScriptDirectory, default_template, slugify


@pytest.fixture
def script(tmp_path: Path) -> ScriptDirectory:
    """An empty migrations directory."""
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    return ScriptDirectory(tmp_path / "migrations")


def reload(script: ScriptDirectory) -> ScriptDirectory:
    """A fresh ScriptDirectory on the same path, so files are read again."""
    return ScriptDirectory(script.path)


class TestGenerate:
    def test_first_revision_is_a_base(self, script: ScriptDirectory) -> None:
        """The first revision revises nothing and gets a 12-hex id and a slugged file name."""
        rev = script.generate_revision("Create the Author table!")
        assert re.fullmatch(r"[0-9a-f]{12}", rev.revision)
        assert rev.down_revision is None
        assert rev.path is not None
        assert rev.path.name == f"{rev.revision}_create_the_author_table.py"
        assert rev.message == "Create the Author table!"

    def test_next_revision_builds_on_head(self, script: ScriptDirectory) -> None:
        """A second revision revises the head, and both load back from disk."""
        first = script.generate_revision("one")
        second = script.generate_revision("two")
        assert second.down_revision == first.revision
        rmap = reload(script).revision_map
        assert rmap.heads == (second.revision,)
        assert rmap.get_revision(second.revision).message == "two"

    def test_template_content(self, script: ScriptDirectory) -> None:
        """The file has the docstring, ids, typed functions, imports and indented bodies."""
        rev = script.generate_revision(
            "add bio",
            rev_id="abc123",
            body_upgrade='op.add_thing("a")\nop.add_thing("b")',
            body_downgrade="op.reverse_of(upgrade)",
            imports=["import os"],
        )
        assert rev.path is not None
        text = rev.path.read_text()
        assert text.startswith('"""add bio\n\nRevision ID: abc123\nRevises: <base>\n')
        assert 'revision: str = "abc123"\n' in text
        assert "down_revision: str | tuple[str, ...] | None = None\n" in text
        assert "def upgrade(op: Operations) -> None:\n" in text
        assert '    op.add_thing("a")\n    op.add_thing("b")\n' in text
        assert "def downgrade(op: Operations) -> None:\n    op.reverse_of(upgrade)\n" in text
        assert "\nimport os\n" in text
        assert "from alembic_like.operations import Operations" in text
        ast.parse(text)
        module = reload(script).revision_map.get_revision("abc123").module
        assert module is not None and callable(module.upgrade) and callable(module.downgrade)

    def test_message_with_quotes_round_trips(self, script: ScriptDirectory) -> None:
        """Quotes, triple quotes and backslashes in a message survive the docstring."""
        message = 'say """hi""" to C:\\temp and "you"'
        script.generate_revision(message, rev_id="q1")
        assert reload(script).revision_map.get_revision("q1").message == message

    def test_non_head_needs_splice(self, script: ScriptDirectory) -> None:
        """Basing a revision on a non-head is refused unless splice, which makes a branch."""
        first = script.generate_revision("one", rev_id="r1")
        script.generate_revision("two", rev_id="r2")
        with pytest.raises(CommandError, match="not a head"):
            script.generate_revision("branch", head=first.revision)
        script.generate_revision("branch", head="r1", splice=True, rev_id="r3")
        assert set(script.revision_map.heads) == {"r2", "r3"}

    def test_several_heads_need_a_choice(self, script: ScriptDirectory) -> None:
        """With two heads, 'head' is ambiguous; naming one works; 'heads' merges them."""
        script.generate_revision("one", rev_id="r1")
        script.generate_revision("two", rev_id="r2")
        script.generate_revision("three", head="r1", splice=True, rev_id="r3")
        with pytest.raises(MultipleHeads):
            script.generate_revision("four")
        merge = script.generate_revision("merge", head=["heads"], rev_id="m1")
        assert merge.down_revision == ("r2", "r3")
        assert script.revision_map.heads == ("m1",)
        assert reload(script).revision_map.get_revision("m1").is_merge

    def test_base_starts_a_new_root(self, script: ScriptDirectory) -> None:
        """head='base' writes a second, independent base."""
        script.generate_revision("one", rev_id="r1")
        script.generate_revision("other root", head="base", rev_id="x1")
        assert set(script.revision_map.bases) == {"r1", "x1"}

    def test_bad_rev_ids_write_nothing(self, script: ScriptDirectory) -> None:
        """An existing or illegal rev_id is refused before any file is written."""
        script.generate_revision("one", rev_id="r1")
        with pytest.raises(RevisionError, match="already present"):
            script.generate_revision("again", rev_id="r1")
        with pytest.raises(RevisionError):
            script.generate_revision("dash", rev_id="a-b")
        assert len(list(script.versions_dir.glob("*.py"))) == 1

    def test_directory_template_wins(self, script: ScriptDirectory) -> None:
        """A script.py.tmpl in the migrations directory replaces the packaged one."""
        custom = default_template().replace("${op_type}", "MyOps")
        (script.path / TEMPLATE_NAME).write_text("# custom\n" + custom)
        rev = script.generate_revision("custom", rev_id="c1")
        assert rev.path is not None
        text = rev.path.read_text()
        assert text.startswith("# custom\n") and "def upgrade(op: MyOps)" in text

    def test_unknown_placeholder_is_reported(self, script: ScriptDirectory) -> None:
        """A template placeholder with no value is a CommandError."""
        (script.path / TEMPLATE_NAME).write_text("${nope}\n")
        with pytest.raises(CommandError, match="placeholder"):
            script.generate_revision("x")


class TestLoad:
    def write(self, script: ScriptDirectory, name: str, text: str) -> None:
        """Write a file into versions/."""
        (script.versions_dir / name).write_text(text)

    def test_files_are_loaded_with_modules(self, script: ScriptDirectory) -> None:
        """A hand-written file becomes a Revision carrying its module and path."""
        self.write(
            script,
            "a_first.py",
            '"""First.\n\nMore text."""\nrevision = "a1"\ndown_revision = None\n'
            "def upgrade(op): pass\ndef downgrade(op): pass\n",
        )
        self.write(script, "__init__.py", "raise RuntimeError('not a revision')\n")
        rev = script.revision_map.get_revision("a1")
        assert rev.message == "First."
        assert rev.path == script.versions_dir / "a_first.py"
        assert rev.module is not None

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("down_revision = None\n", "no `revision` string"),
            ("revision = 'x'\ndown_revision = 3\n", "down_revision must be"),
            ("revision = 'x'\ndef upgrade(op): pass\n", "no downgrade"),
            ("revision = (\n", "Could not load"),
        ],
    )
    def test_broken_files_are_reported(
        self, script: ScriptDirectory, text: str, match: str
    ) -> None:
        """A file that is not a valid revision raises CommandError naming the problem."""
        self.write(script, "broken.py", text)
        with pytest.raises(CommandError, match=match):
            _ = script.revision_map

    def test_from_config_requires_directory(self, tmp_path: Path) -> None:
        """A config whose migrations directory does not exist says to run init."""
        config = Config(path=tmp_path / "pyproject.toml")
        with pytest.raises(CommandError, match="run init"):
            ScriptDirectory.from_config(config)


def test_slugify() -> None:
    """Slugs keep words, drop punctuation, lower-case and cut at a word boundary."""
    assert slugify("Add the 'bio' field, again!") == "add_the_bio_field_again"
    long = slugify("word " * 30)
    assert len(long) <= 40 and long.endswith("word") and not long.endswith("_")
    assert slugify("") == ""
