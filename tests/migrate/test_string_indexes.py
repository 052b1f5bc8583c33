"""Tests for `op.create_index(..., kind="sorted" | "text" | "suffix")` on str fields
(`redmap.migrate.impl`): the backfill equals what the flush writes; downgrade drops it."""

from __future__ import annotations

import redmap
from redmap import col, select

from .conftest import Project, stored
from .test_ops import models, renamed_prefix

HEADER_FIX = ("from redmap import Indexed,", "from redmap import Suffix, Text, Indexed,")
PLAIN = """\
    name: str
    email: str = ""
    bio: Optional[str] = None
"""
STRINGS = """\
    name: Annotated[str, Sorted()]
    email: Annotated[str, Suffix()] = ""
    bio: Annotated[Optional[str], Text()] = None
"""
CREATE = """
op.create_index("Author", "name", kind="sorted")
op.create_index("Author", "email", kind="suffix")
op.create_index("Author", "bio", kind="text")
"""


def _models(body: str, prefix: str = "app") -> str:
    return models(body, prefix=prefix).replace(*HEADER_FIX)


def _seed(project: Project, body: str, prefix: str) -> None:
    project.write_models(_models(body, prefix))
    module = project.models()
    with redmap.Session(project.engine) as s:
        for i in range(25):
            s.add(
                module.Author(
                    name=f"n\x00{i % 6}é",
                    email=f"u{i}@d{i % 3}.org",
                    bio=None if i % 4 == 0 else f"Word{i % 5} common #new{i}",
                )
            )
        s.commit()


def test_string_index_backfill_matches_flush(project: Project) -> None:
    """The three string kinds backfill exactly the keys the flush writes; down drops them."""
    _seed(project, PLAIN, "app")
    before = stored(project.client)
    _seed(project, STRINGS, "ref")
    project.write_models(_models(STRINGS))
    project.write_revision("r1", None, CREATE)
    project.ok("upgrade", "head")
    ours = stored(project.client, "{app}:author:*")
    reference = renamed_prefix(stored(project.client, "{ref}:author:*"), b"{ref}", b"{app}")
    assert ours == reference
    module = project.models()
    author = module.Author
    with redmap.Session(project.engine) as s:
        assert s.count(select(author).where(col(author.name).startswith("n\x001"))) == 4
        assert s.count(select(author).where(col(author.email).endswith("@d1.org"))) == 8
        assert s.count(select(author).where(col(author.bio).match("word2 COMMON"))) == 4
    project.ok("downgrade", "base")
    after = stored(project.client)
    assert {k: v for k, v in after.items() if not k.startswith(b"{ref}")} == before


def test_autogenerate_sees_string_markers(project: Project) -> None:
    """Adding Sorted()/Suffix()/Text() to str fields autogenerates their create_index."""
    project.write_models(_models(PLAIN))
    project.write_revision("r1", None, "pass")
    project.ok("upgrade", "head")
    project.write_models(_models(STRINGS))
    out = project.ok("revision", "-m", "strings", "--autogenerate")
    text = "".join(p.read_text() for p in (project.root / "migrations" / "versions").glob("*.py"))
    for line in CREATE.strip().splitlines():
        assert line in text, (line, out)


def test_autogenerate_sees_removed_string_markers(project: Project) -> None:
    """Removing Sorted()/Suffix()/Text() from str fields autogenerates their drop_index."""
    project.write_models(_models(STRINGS))
    project.write_revision("r1", None, CREATE)
    project.ok("upgrade", "head")
    project.write_models(_models(PLAIN))
    out = project.ok("revision", "-m", "plain", "--autogenerate")
    versions = project.root / "migrations" / "versions"
    text = "".join(p.read_text() for p in versions.glob("*.py") if p.name != "r1.py")
    for line in CREATE.strip().splitlines():
        assert line.replace("create_index", "drop_index") in text, (line, out)


def test_rename_field_moves_string_indexes(project: Project) -> None:
    """rename_field moves the ordered, suffix and word index keys with the field."""
    _seed(project, STRINGS, "app")
    before = stored(project.client, "{app}:author:*")
    renamed = (
        STRINGS.replace("name:", "title:").replace("email:", "mail:").replace("bio:", "about:")
    )
    project.write_models(_models(renamed))
    project.write_revision(
        "r1",
        None,
        'op.rename_field("Author", "name", "title")\n'
        'op.rename_field("Author", "email", "mail")\n'
        'op.rename_field("Author", "bio", "about")',
    )
    project.ok("upgrade", "head")
    author = project.models().Author
    with redmap.Session(project.engine) as s:
        assert s.count(select(author).where(col(author.title).startswith("n\x001"))) == 4
        assert s.count(select(author).where(col(author.mail).endswith("@d1.org"))) == 8
        assert s.count(select(author).where(col(author.about).match("word2 COMMON"))) == 4
        first = s.scalars(select(author).order_by(col(author.title)).limit(1)).one()
        assert first.title == "n\x000é"
    after = stored(project.client, "{app}:author:*")
    assert not any(b"#lx:name" in k or b"#sx:email" in k or b"#tx:bio:" in k for k in after)
    assert len([k for k in after if b"#tx:about:" in k]) == len(
        [k for k in before if b"#tx:bio:" in k]
    )
