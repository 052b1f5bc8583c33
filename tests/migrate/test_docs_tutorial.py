"""The tutorial of `docs/migrations.md`, run step by step against its own code blocks."""

from __future__ import annotations

import re
from pathlib import Path

import redmap

from .conftest import REPO, Project

DOC = (REPO / "docs" / "migrations.md").read_text()
FIRST, SECOND = "1f0c9d2a4b7e", "8ab266abb89e"  # the revision ids the tutorial shows


def blocks(lang: str) -> list[str]:
    """The tutorial's fenced code blocks of one language, in order."""
    tutorial = DOC[: DOC.index("### The other commands")]
    # "```python no-run" blocks too: the page shows them unrun, this test runs them.
    return re.findall(rf"```{lang}(?: no-run)?\n(.*?)```", tutorial, re.S)


def console_output(command: str, nth: int = 0) -> list[str]:
    """The lines the tutorial shows after its `nth` `$ <command>`, up to the next prompt."""
    shown = []
    for block in blocks("console"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line == f"$ {command}":
                rest = lines[i + 1 :]
                end = next((j for j, x in enumerate(rest) if x.startswith("$ ")), len(rest))
                shown.append(rest[:end])
    assert len(shown) > nth, f"the tutorial shows no `$ {command}` #{nth}"
    return shown[nth]


def body(text: str, function: str = "upgrade") -> list[str]:
    """The stripped, non-empty lines of `function`'s body in a revision file."""
    start = text.index(f"def {function}(")
    end = text.find("\ndef ", start + 1)
    lines = text[start : end if end > 0 else None].splitlines()[1:]
    return [line.strip() for line in lines if line.strip()]


def test_tutorial_from_init_to_rollback(project: Project) -> None:
    """Every tutorial step gives what the page says, with the page's own code."""
    python = blocks("python")
    models_src, changed_fields, generated, edited = python[0], python[1], python[2], python[3]
    package = project.root / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(models_src)
    (project.root / "pyproject.toml").write_text('[project]\nname = "demo"\n')

    out = project.ok("init", "--url", project.url)
    assert out.splitlines() == console_output("redmap migrate init --url redis://localhost:6379/0")
    with (project.root / "pyproject.toml").open("a") as f:
        f.write('models = "myapp.models:reg"\n')

    project.ok("revision", "--autogenerate", "-m", "initial", "--rev-id", FIRST)
    out = project.ok("upgrade", "head")
    assert out.splitlines() == console_output("redmap migrate upgrade head")
    models = project.models_from(package / "models.py")
    with redmap.Session(project.engine) as s:
        s.add_all(models.Author(name=f"n{i}", email=f"e{i}@x") for i in range(1000))
        s.commit()

    old_fields = "    name: Annotated[str, Indexed()]\n    email: Annotated[str, Unique()]\n"
    assert old_fields in models_src
    (package / "models.py").write_text(models_src.replace(old_fields, changed_fields))
    drift = project.run("check")
    assert drift.code == 1
    assert drift.err.splitlines()[:2] == console_output("redmap migrate check")[:2]

    out = project.ok("revision", "--autogenerate", "-m", "fullname and country", "--rev-id", SECOND)
    assert out.splitlines() == console_output(
        'redmap migrate revision --autogenerate -m "fullname and country"'
    )
    path = Path(out.split()[1])
    written = (project.root / path).read_text()
    assert body(written) == body(generated)
    assert body(written, "downgrade") == body(generated, "downgrade")

    start, end = written.index("def upgrade("), written.index("def downgrade(")
    (project.root / path).write_text(written[:start] + edited.strip() + "\n\n\n" + written[end:])
    dry = project.ok("upgrade", "head", "--dry-run")
    assert dry.splitlines() == console_output("redmap migrate upgrade head --dry-run")

    out = project.ok("upgrade", "head").splitlines()
    shown = console_output("redmap migrate upgrade head", 1)
    assert out[0] == shown[0]
    assert shown[1] in out  # the operation's start line
    assert shown[3] in out  # the per-operation summary line
    assert project.ok("current").splitlines()[1:] == console_output("redmap migrate current")
    in_sync = project.run("check")
    assert in_sync.code == 0 and in_sync.out.splitlines() == ["No new upgrade operations detected."]

    out = project.ok("downgrade", "-1")
    assert out.splitlines()[0] == console_output("redmap migrate downgrade -1")[0]
    author = project.client.hgetall("{app}:author:1")
    assert author[b"name"] == b"n0" and b"fullname" not in author and b"country" not in author
    assert project.client.smembers("{app}:author:#ix:name:n0") == {b"1"}
    assert not list(project.client.scan_iter(match="{app}:author:#ix:country:*"))
