"""Tests for `redmap.migrate.autogenerate` and `layout`: pure diffs of layout snapshots."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

from redmap import ForeignKey, Indexed, PrimaryKey, Sorted, Unique, registry, relationship
from redmap.migrate.autogenerate import compare
from redmap.migrate.layout import literal, snapshot

reg = registry(prefix="g")


@reg.mapped
@dataclass
class Author:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()] = 0
    bio: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    books: list[Book] = relationship(back_populates="author")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Book:
    title: str = ""
    author_id: Annotated[Optional[int], ForeignKey("Author")] = None
    author: Optional[Author] = relationship(back_populates="books")
    id: Annotated[Optional[int], PrimaryKey()] = None


BASE = snapshot(reg)


def edited(**changes: Any) -> dict[str, Any]:
    """A deep copy of BASE's models with `Author` replaced by `changes` applied."""
    layout = copy.deepcopy(BASE)
    layout["models"]["Author"].update(changes)
    return layout


def author_fields() -> dict[str, Any]:
    return copy.deepcopy(BASE["models"]["Author"]["fields"])


class TestSnapshot:
    def test_snapshot_records_fields_indexes_defaults_and_relationships(self) -> None:
        """A snapshot is JSON with types, index kinds, literal defaults and relationships."""
        author = json.loads(json.dumps(BASE))["models"]["Author"]
        assert author["keyspace"] == "author"
        assert author["primary_key"] == {"name": "id", "type": "Optional[int]"}
        assert author["fields"]["name"] == {"type": "str", "indexes": ["indexed"]}
        assert author["fields"]["age"] == {"type": "int", "indexes": ["sorted"], "default": "0"}
        assert author["fields"]["bio"]["default"] == "None"
        assert "default" not in author["fields"]["tags"]  # a factory is not a literal
        assert author["relationships"]["books"]["target"] == "Book"
        assert author["relationships"]["books"]["kind"] == "one-to-many"
        book = BASE["models"]["Book"]
        assert book["fields"]["author_id"]["foreign_key"] == "Author"

    def test_literal_renders_plain_values_only(self) -> None:
        """Defaults become source only for plain literals; strings get double quotes."""
        assert [literal(v) for v in (None, True, 3, 1.5, "x", b"y")] == [
            "None",
            "True",
            "3",
            "1.5",
            '"x"',
            "b'y'",
        ]
        assert literal('say "hi"') == "'say \"hi\"'"
        assert literal(float("nan")) is None and literal([1]) is None


class TestCompare:
    def test_same_layout_gives_nothing(self) -> None:
        """Models equal to the recorded layout: no lines, so check passes."""
        assert compare(BASE, snapshot(reg)) == []

    def test_nothing_recorded_lists_every_model_as_new(self) -> None:
        """Without a recorded layout, every model is new; comments only end with pass."""
        assert compare(None, BASE) == [
            "# new model Author (keyspace 'author'): nothing to migrate",
            "# new model Book (keyspace 'book'): nothing to migrate",
            "pass",
        ]

    def test_added_and_removed_fields_with_a_rename_hint(self) -> None:
        """A field gone and one of the same type added give add/drop plus a commented rename."""
        fields = author_fields()
        fields["fullname"] = fields.pop("name")
        fields["country"] = {"type": "str", "indexes": [], "default": '"NZ"'}
        lines = compare(BASE, edited(fields=fields))
        assert lines == [
            '# op.rename_field("Author", "name", "fullname")  # uncomment if this is a rename',
            '# op.rename_field("Author", "name", "country")  # uncomment if this is a rename',
            'op.add_field("Author", "fullname", default=None)'
            "  # TODO: the value existing objects get (str, required)",
            'op.create_index("Author", "fullname", kind="indexed")',
            'op.add_field("Author", "country", default="NZ")',
            'op.drop_index("Author", "name", kind="indexed")',
            'op.drop_field("Author", "name")',
        ]

    def test_index_changes_rebuild_shared_equality_sets(self) -> None:
        """Dropping Indexed from a field that stays Unique rebuilds the unique index after."""
        fields = author_fields()
        fields["email"]["indexes"] = ["unique"]
        fields["name"]["indexes"] = []
        fields["age"]["indexes"] = []
        both = copy.deepcopy(BASE)
        both["models"]["Author"]["fields"]["email"]["indexes"] = ["indexed", "unique"]
        assert compare(both, edited(fields=fields)) == [
            'op.drop_index("Author", "name", kind="indexed")',
            'op.drop_index("Author", "email", kind="indexed")',
            'op.create_index("Author", "email", kind="unique")',
            'op.drop_index("Author", "age", kind="sorted")',
        ]

    def test_keyspace_change_is_a_rename_model(self) -> None:
        """A model whose keyspace changed is moved with rename_model."""
        assert compare(BASE, edited(keyspace="writers")) == ['op.rename_model("author", "writers")']

    def test_class_renamed_with_keyspace_kept_is_the_same_model(self) -> None:
        """A class renamed in code that keeps its keyspace is compared as the same model."""
        layout = copy.deepcopy(BASE)
        layout["models"]["Writer"] = layout["models"].pop("Author")
        layout["models"]["Writer"]["fields"]["bio"]["type"] = "str"
        assert compare(BASE, layout) == [
            "# model Author is now Writer (keyspace 'author')",
            "# Writer.bio changed type Optional[str] -> str: stored values are not converted; "
            'write an op.transform("Writer", fn) if they must be',
            "pass",
        ]

    def test_removed_and_added_models_with_same_fields_suggest_rename_model(self) -> None:
        """A model gone and one added with equal fields is offered as a commented rename."""
        layout = copy.deepcopy(BASE)
        writer = layout["models"].pop("Author")
        layout["models"]["Writer"] = dict(writer, keyspace="writer")
        assert compare(BASE, layout) == [
            '# op.rename_model("author", "writer")  # uncomment if Author became Writer',
            "# new model Writer (keyspace 'writer'): nothing to migrate",
            "# model Author (keyspace 'author') is no longer mapped; its keys are left in place",
            "pass",
        ]

    def test_relationship_and_primary_key_changes_are_comments(self) -> None:
        """What migrations do not rewrite (links, ids) is pointed out, not generated."""
        rels = copy.deepcopy(BASE["models"]["Author"]["relationships"])
        rels["fans"] = {"target": "Book", "kind": "many-to-many", "secondary": "fans"}
        del rels["books"]
        lines = compare(BASE, edited(relationships=rels, primary_key={"name": "id", "type": "str"}))
        assert lines[0].startswith("# Author primary key changed")
        assert lines[1:] == [
            "# relationship Author.books removed: its link keys are left in place",
            "# relationship Author.fans added (many-to-many to Book): existing links are not "
            "backfilled",
            "pass",
        ]
