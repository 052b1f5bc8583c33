"""Tests for `redmap.migrate.ops` and `impl`: every operation up and down through the CLI."""

from __future__ import annotations

from typing import Any

import redmap
from redmap import select
from redmap.testing.assertions import dump_keys

from .conftest import Project, stored

HEADER = """\
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from redmap import Indexed, PrimaryKey, Sorted, Unique, registry

reg = registry(prefix="{prefix}")
"""

# Tag ids hold glob characters and a "#": SCAN patterns and the "#" filter must cope.
HOSTILE_SLUGS = ["a*b", "[x]", "q?", "back\\slash", "#hash", "sp ace", "x:y", "plain"]


def models(author: str, *, keyspace: str | None = None, prefix: str = "app") -> str:
    """Source of a models module: Author with the given body, plus Tag and a decoy."""
    ks = f'    __keyspace__ = "{keyspace}"\n' if keyspace else ""
    return (
        HEADER.format(prefix=prefix)
        + "\n\n@reg.mapped\n@dataclass\nclass Author:\n"
        + ks
        + author
        + "    id: Annotated[Optional[int], PrimaryKey()] = None\n"
        + """

@reg.mapped
@dataclass
class Tag:
    slug: Annotated[str, PrimaryKey()]
    label: str = ""


@reg.mapped
@dataclass
class Decoy:
    __keyspace__ = "author.x"
    name: Annotated[str, Indexed()] = ""
"""
    )


BASE = """\
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()] = 0
    nick: Optional[str] = None
"""


def seed(project: Project, n: int = 60, **extra: Any) -> Any:
    """Write n authors, the hostile tags and decoys through redmap; returns the models module."""
    module = project.models()
    with redmap.Session(project.engine) as s:
        for i in range(n):
            fields = {k: (v(i) if callable(v) else v) for k, v in extra.items()}
            nick = None if i % 3 == 0 else f"nick{i}"
            s.add(module.Author(name=f"n{i}", email=f"e{i}@x", age=i % 7, nick=nick, **fields))
        s.add_all(module.Tag(slug=slug, label=f"label {slug}") for slug in HOSTILE_SLUGS)
        s.add_all(module.Decoy(name=f"n{i}") for i in range(5))
        s.commit()
    return module


def objects(project: Project, keyspace: str = "author") -> dict[bytes, dict[bytes, bytes]]:
    """Every object hash of a keyspace (by key), versions included."""
    prefix = "{app}:" + keyspace + ":"
    return {
        k: project.client.hgetall(k)
        for k in project.client.scan_iter(match=prefix + "*", count=1000)
        if not k[len(prefix) :].startswith(b"#")
    }


def keys_of(project: Project, pattern: str) -> set[bytes]:
    return set(project.client.scan_iter(match=pattern, count=1000))


class TestFields:
    def test_add_field_up_and_down(self, project: Project) -> None:
        """add_field stores the default in every object (both name forms); down removes it."""
        project.write_models(models(BASE))
        seed(project)
        before = stored(project.client)
        project.write_models(models(BASE + '    country: str = "NZ"\n'))
        project.write_revision(
            "r1",
            None,
            """
            op.add_field("Author", "country", default="NZ")
            op.add_field("tag", "lang", default="en")
            op.add_field("Author", "extra", default=None)
            """,
        )
        project.ok("upgrade", "head")
        authors = objects(project)
        assert len(authors) == 60
        assert all(h[b"country"] == b"NZ" and h[b"#v"] == b"2" for h in authors.values())
        assert all(b"extra" not in h for h in authors.values())
        tags = objects(project, "tag")
        assert len(tags) == len(HOSTILE_SLUGS)
        assert all(h[b"lang"] == b"en" for h in tags.values())
        module = project.models()
        with redmap.Session(project.engine) as s:
            assert {a.country for a in s.scalars(select(module.Author)).all()} == {"NZ"}
        assert all(b"lang" not in h for h in objects(project, "author.x").values())
        project.ok("downgrade", "base")
        assert stored(project.client) == before

    def test_drop_field_with_default_is_reversible(self, project: Project) -> None:
        """drop_field removes the field; its reverse gives every object the default back."""
        project.write_models(models(BASE))
        seed(project)
        project.write_models(models(BASE.replace("    nick: Optional[str] = None\n", "")))
        project.write_revision("r1", None, 'op.drop_field("Author", "nick", default="anon")')
        project.ok("upgrade", "head")
        assert all(b"nick" not in h for h in objects(project).values())
        module = project.models()
        with redmap.Session(project.engine) as s:
            assert len(s.scalars(select(module.Author)).all()) == 60
        project.ok("downgrade", "base")
        assert {h[b"nick"] for h in objects(project).values()} == {b"anon"}

    def test_drop_field_without_default_refuses_downgrade(self, project: Project) -> None:
        """Without default=, downgrade stops before any step with an irreversibility message."""
        project.write_models(models(BASE))
        seed(project, n=10)
        project.write_revision("r1", None, 'op.drop_field("Author", "nick")')
        project.ok("upgrade", "head")
        before = dump_keys(project.client)
        result = project.run("downgrade", "base")
        assert result.code == 1
        assert "cannot be reversed" in result.err and "Traceback" not in result.err
        assert dump_keys(project.client) == before
        assert project.heads() == ["r1"]

    def test_rename_field_moves_values_and_index_keys(self, project: Project) -> None:
        """rename_field moves values and every index family; queries work; down restores."""
        project.write_models(models(BASE))
        seed(project)
        before = stored(project.client)
        renamed = (
            BASE.replace("name:", "fullname:").replace("email:", "mail:").replace("age:", "years:")
        )
        project.write_models(models(renamed))
        project.write_revision(
            "r1",
            None,
            """
            op.rename_field("Author", "name", "fullname")
            op.rename_field("Author", "email", "mail")
            op.rename_field("Author", "age", "years")
            """,
        )
        project.ok("upgrade", "head")
        authors = objects(project)
        assert all(set(h) >= {b"fullname", b"mail", b"years"} for h in authors.values())
        assert not any(set(h) & {b"name", b"email", b"age"} for h in authors.values())
        assert not keys_of(project, "{app}:author:#ix:name:*")
        assert not keys_of(project, "{app}:author:#uq:email:*")
        assert len(keys_of(project, "{app}:author:#uq:mail:*")) == 60
        assert project.client.zcard("{app}:author:#zs:years") == 60
        assert keys_of(project, "{app}:author.x:#ix:name:*")  # the decoy keeps its index
        module = project.models()
        with redmap.Session(project.engine) as s:
            found = s.scalars(select(module.Author).where(module.Author.fullname == "n4")).one()
            assert found.mail == "e4@x"
            ordered = s.scalars(select(module.Author).order_by(module.Author.years)).all()
            assert [a.years for a in ordered] == sorted(i % 7 for i in range(60))
        project.ok("downgrade", "base")
        assert stored(project.client) == before


INDEXED = """\
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    city: Annotated[str, Indexed()] = ""
    code: Annotated[Optional[str], Unique()] = None
    score: Annotated[Optional[int], Sorted()] = None
"""
PLAIN = (
    INDEXED.replace("Annotated[str, Indexed()] = ", "str = ")
    .replace("Annotated[Optional[str], Unique()]", "Optional[str]")
    .replace("Annotated[Optional[int], Sorted()]", "Optional[int]")
)


def seed_indexed(project: Project, prefix: str = "app", codes: Any = None) -> None:
    """30 authors with cities, codes (None every 5th) and scores (None every 4th)."""
    project.write_models(models(PLAIN, prefix=prefix))
    module = project.models()
    with redmap.Session(project.engine) as s:
        for i in range(30):
            code = codes(i) if codes else (None if i % 5 == 0 else f"c{i}")
            s.add(
                module.Author(
                    name=f"n{i}",
                    email=f"e{i}@x",
                    city=f"city{i % 4}",
                    code=code,
                    score=None if i % 4 == 0 else (i * 37) % 11 - 5,
                )
            )
        s.commit()


def renamed_prefix(data: dict[bytes, Any], old: bytes, new: bytes) -> dict[bytes, Any]:
    return {k.replace(old, new, 1): v for k, v in data.items()}


CREATE_ALL = """
op.create_index("Author", "city", kind="indexed")
op.create_index("Author", "code", kind="unique")
op.create_index("Author", "score", kind="sorted")
"""


class TestIndexes:
    def test_create_index_matches_what_redmap_writes(self, project: Project) -> None:
        """Each kind's backfill equals what redmap writes for indexed models; down drops it."""
        seed_indexed(project)
        before = stored(project.client)
        # The same objects written by redmap with the indexes declared, under prefix "ref".
        project.write_models(models(INDEXED, prefix="ref"))
        module = project.models()
        with redmap.Session(project.engine) as s:
            for i in range(30):
                s.add(
                    module.Author(
                        name=f"n{i}",
                        email=f"e{i}@x",
                        city=f"city{i % 4}",
                        code=None if i % 5 == 0 else f"c{i}",
                        score=None if i % 4 == 0 else (i * 37) % 11 - 5,
                    )
                )
            s.commit()
        project.write_models(models(INDEXED))
        project.write_revision("r1", None, CREATE_ALL)
        project.ok("upgrade", "head")
        ours = stored(project.client, "{app}:author:*")
        reference = renamed_prefix(stored(project.client, "{ref}:author:*"), b"{ref}", b"{app}")
        assert ours == reference
        module = project.models()
        with redmap.Session(project.engine) as s:
            assert s.count(select(module.Author).where(module.Author.city == "city1")) == 8
            assert s.scalars(select(module.Author).where(module.Author.code == "c7")).one().id
        project.ok("downgrade", "base")
        assert stored(project.client, "{app}:*") == before

    def test_drop_index_up_and_down(self, project: Project) -> None:
        """drop_index deletes exactly the kind's keys; its reverse rebuilds them identically."""
        project.write_models(models(INDEXED))
        module = project.models()
        with redmap.Session(project.engine) as s:
            s.add_all(
                module.Author(
                    name=f"n{i}", email=f"e{i}@x", city=f"c{i % 3}", code=f"k{i}", score=i
                )
                for i in range(25)
            )
            s.commit()
        before = stored(project.client)
        project.write_models(models(PLAIN))
        project.write_revision(
            "r1",
            None,
            """
            op.drop_index("Author", "city", kind="indexed")
            op.drop_index("Author", "code", kind="unique")
            op.drop_index("Author", "score", kind="sorted")
            """,
        )
        project.ok("upgrade", "head")
        for pattern in ("#ix:city:*", "#uq:code:*", "#ix:code:*", "#zs:score"):
            assert not keys_of(project, "{app}:author:" + pattern), pattern
        assert len(keys_of(project, "{app}:author:#ix:name:*")) == 25
        assert len(keys_of(project, "{app}:author:#uq:email:*")) == 25
        project.write_models(models(INDEXED))  # the sorted rebuild needs the field's type
        project.ok("downgrade", "base")
        assert stored(project.client) == before

    def test_unique_index_over_duplicates_fails_changing_nothing(self, project: Project) -> None:
        """A unique backfill over duplicate values lists them and writes nothing at all."""
        seed_indexed(project, codes=lambda i: f"dup{i % 3}" if i < 6 else f"c{i}")
        before = dump_keys(project.client)
        project.write_models(models(INDEXED))
        project.write_revision("r1", None, 'op.create_index("Author", "code", kind="unique")')
        result = project.run("upgrade", "head")
        assert result.code == 1
        assert "3 values of Author.code are not unique" in result.err
        for value, ids in (("dup0", "1, 4"), ("dup1", "2, 5"), ("dup2", "3, 6")):
            assert f"'{value}' held by {ids}" in result.err
        assert "nothing was written" in result.err
        assert dump_keys(project.client) == before
        assert project.heads() == []


class TestModels:
    def test_rename_model_moves_every_key_and_back(self, project: Project) -> None:
        """rename_model moves objects, indexes and the counter; down gives the exact dump back."""
        project.write_models(models(BASE))
        seed(project)
        before = dump_keys(project.client, "{app}:[a-z]*")  # data keys, not #meta
        old_keys = keys_of(project, "{app}:author:*")
        project.write_models(models(BASE, keyspace="writer"))
        project.write_revision("r1", None, 'op.rename_model("author", "writer")')
        project.ok("upgrade", "head")
        assert not keys_of(project, "{app}:author:*")
        moved = keys_of(project, "{app}:writer:*")
        assert moved == {k.replace(b":author:", b":writer:", 1) for k in old_keys}
        assert len(keys_of(project, "{app}:author.x:*")) == len(
            {k for k in before if k.startswith(b"{app}:author.x:")}
        )
        assert project.client.get("{app}:writer:#seq") == b"60"
        module = project.models()
        with redmap.Session(project.engine) as s:
            assert s.count(select(module.Author)) == 60
            assert s.scalars(select(module.Author).where(module.Author.name == "n9")).one().id == 10
        project.ok("downgrade", "base")
        assert dump_keys(project.client, "{app}:[a-z]*") == before

    def test_transform_up_and_down_keeps_indexes(self, project: Project) -> None:
        """transform rewrites values through fn and reverse_fn, moving index entries along."""
        project.write_models(models(BASE))
        seed(project)
        before = stored(project.client)
        project.write_revision(
            "r1",
            None,
            """
            op.transform("Author", upper, lower)
            """,
            header="""\
            def upper(fields):
                fields["name"] = fields["name"].upper()


            def lower(fields):
                return {**fields, "name": fields["name"].lower()}


            """,
        )
        project.ok("upgrade", "head")
        assert {h[b"name"] for h in objects(project).values()} == {
            f"N{i}".encode() for i in range(60)
        }
        assert not keys_of(project, "{app}:author:#ix:name:n*")
        module = project.models()
        with redmap.Session(project.engine) as s:
            assert (
                s.scalars(select(module.Author).where(module.Author.name == "N5")).one().email
                == "e5@x"
            )
        project.ok("downgrade", "base")
        assert stored(project.client) == before

    def test_execute_gets_the_raw_client(self, project: Project) -> None:
        """execute calls fn with the redis client; its reverse_fn undoes it on downgrade."""
        project.write_models(models(BASE))
        project.write_revision(
            "r1",
            None,
            """op.execute(lambda c: c.set("marker", "up"), lambda c: c.delete("marker"))""",
        )
        project.ok("upgrade", "head")
        assert project.client.get("marker") == b"up"
        project.ok("downgrade", "base")
        assert project.client.get("marker") is None


def test_bad_index_kind_fails_the_step(project: Project) -> None:
    """An unknown index kind stops the step with a MigrationError message and heads unchanged."""
    project.write_models(models(BASE))
    project.write_revision("r1", None, 'op.create_index("Author", "name", kind="bogus")')
    result = project.run("upgrade", "head")
    assert result.code == 1
    assert "index kind must be one of indexed, unique, sorted" in result.err
    assert project.heads() == []


CLUBS = """\
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from redmap import ForeignKey, PrimaryKey, Sorted, registry, relationship

reg = registry(prefix="app")


@reg.mapped
@dataclass
class Club:
    name: str
    members: list["Member"] = relationship(back_populates="club", order_by="Member.rank")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Member:
    name: str
    rank: Annotated[int, Sorted()] = 0
    club_id: Annotated[Optional[int], ForeignKey("Club")] = None
    club: Optional[Club] = relationship(back_populates="members")
    id: Annotated[Optional[int], PrimaryKey()] = None
"""


class TestTransformForeignKeys:
    def test_transform_moves_children_between_parents_and_reorders_them(
        self, project: Project
    ) -> None:
        """A transform that changes a foreign key (or the field ordering the parent's
        list) moves the object's entry in the parents' children zsets as a flush would:
        the lists read right and the audit is clean; down moves them back."""
        from redmap.audit import audit

        project.write_models(CLUBS)
        module = project.models()
        with redmap.Session(project.engine) as s:
            a, b = module.Club(name="a"), module.Club(name="b")
            s.add_all([a, b])
            s.flush()
            s.add_all(module.Member(name=f"m{i}", rank=i, club_id=a.id) for i in range(6))
            s.commit()
        before = stored(project.client)
        project.write_revision(
            "r1",
            None,
            'op.transform("Member", to_b, to_a)',
            header="""\
            def to_b(fields):
                n = int(fields["name"][1:])
                if n % 2:
                    fields["club_id"] = b"2"
                fields["rank"] = str(10 - n).encode()


            def to_a(fields):
                n = int(fields["name"][1:])
                fields["club_id"] = b"1"
                fields["rank"] = str(n).encode()


            """,
        )
        project.ok("upgrade", "head")
        assert audit(project.client, module.reg).ok
        with redmap.Session(project.engine) as s:
            clubs = {c.name: c for c in s.scalars(select(module.Club)).all()}
            assert [m.name for m in clubs["a"].members] == ["m4", "m2", "m0"]
            assert [m.name for m in clubs["b"].members] == ["m5", "m3", "m1"]
        project.ok("downgrade", "base")
        assert audit(project.client, module.reg).ok
        assert stored(project.client) == before
