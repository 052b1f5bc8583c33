"""The revision graph as pure data; owns `Revision`, `RevisionMap` and migration plans.

Called by `script` (which builds a map from files), `runtime` (plans, head bookkeeping)
and `command` (heads, history). No files and no database: everything here is computed
from in-memory `Revision` objects, so the graph is tested without either.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from alembic_like.exc import (
    CycleDetected,
    DependencyError,
    MultipleHeads,
    ResolutionError,
    RevisionError,
)

__all__ = ["Direction", "MigrationStep", "Revision", "RevisionMap"]

#: Words with a meaning of their own in a target; no revision may be called this.
RESERVED = frozenset({"base", "head", "heads"})
# "+" and "-" introduce relative steps ("head-1"), "@" is kept free as Alembic does.
_ILLEGAL_CHARS = frozenset("@+-")
_RELATIVE = re.compile(r"^(?P<symbol>[^+-]*)(?P<delta>[+-]\d+)$")


class Direction(str, enum.Enum):
    """Which way a migration step goes; the value is the revision function's name."""

    UP = "upgrade"  # run the revision's upgrade(op)
    DOWN = "downgrade"  # run the revision's downgrade(op)


@dataclass(frozen=True)
class Revision:
    """One node of the graph: an id, the ids it revises, and a message.

    `down_revision` is `None` for a base, a string for an ordinary revision, and a
    tuple of two or more ids for a merge revision. `path` and `module` are set by
    `ScriptDirectory` for revisions loaded from files and are not compared.
    """

    revision: str
    down_revision: str | tuple[str, ...] | None = None
    message: str = ""
    path: Path | None = field(default=None, compare=False)
    module: ModuleType | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        rev = self.revision
        if not isinstance(rev, str) or not rev:
            raise RevisionError(f"A revision id must be a non-empty string, got {rev!r}")
        bad = sorted(_ILLEGAL_CHARS.intersection(rev))
        if bad:
            raise RevisionError(
                f"Character(s) {''.join(bad)!r} not allowed in revision identifier {rev!r}"
            )
        if rev in RESERVED:
            raise RevisionError(f"{rev!r} is a reserved word and cannot be a revision id")
        down = self.down_revision
        if isinstance(down, (list, tuple)):
            down = tuple(down)
            object.__setattr__(self, "down_revision", down or None)
        if rev in self.down_revisions:
            raise CycleDetected([rev])

    @property
    def down_revisions(self) -> tuple[str, ...]:
        """The ids this revision revises, as a tuple (empty for a base)."""
        down = self.down_revision
        if down is None:
            return ()
        return (down,) if isinstance(down, str) else down

    @property
    def is_base(self) -> bool:
        """True when the revision revises nothing."""
        return not self.down_revisions

    @property
    def is_merge(self) -> bool:
        """True when the revision joins two or more branches."""
        return len(self.down_revisions) > 1


@dataclass(frozen=True)
class MigrationStep:
    """One step of a plan: run `revision` in `direction`."""

    revision: Revision
    direction: Direction

    def __str__(self) -> str:
        rev = self.revision
        below = ", ".join(rev.down_revisions) or "<base>"
        if self.direction is Direction.UP:
            text = f"upgrade {below} -> {rev.revision}"
        else:
            text = f"downgrade {rev.revision} -> {below}"
        return f"{text}, {rev.message}" if rev.message else text


class RevisionMap:
    """An immutable DAG of revisions, validated when built.

    Raises `RevisionError` for duplicate ids, `DependencyError` for a down_revision
    that is missing and `CycleDetected` for a loop. Iterating yields revisions
    parents-first; siblings are ordered so that a branch is followed to its end
    before the next one starts, which is also the order of upgrade plans.
    """

    def __init__(self, revisions: Iterable[Revision]) -> None:
        self._revs: dict[str, Revision] = {}
        for rev in revisions:
            if rev.revision in self._revs:
                raise RevisionError(f"Revision {rev.revision} is present more than once")
            self._revs[rev.revision] = rev
        self._children: dict[str, list[str]] = {rid: [] for rid in self._revs}
        for rev in self._revs.values():
            for parent in rev.down_revisions:
                if parent not in self._revs:
                    raise DependencyError(rev.revision, parent)
                self._children[parent].append(rev.revision)
        self._order = self._sort()
        self._position = {rid: i for i, rid in enumerate(self._order)}
        self.heads: tuple[str, ...] = tuple(r for r in self._order if not self._children[r])
        self.bases: tuple[str, ...] = tuple(r for r in self._order if self._revs[r].is_base)

    def _sort(self) -> list[str]:
        pending = {rid: len(rev.down_revisions) for rid, rev in self._revs.items()}
        stack = sorted((rid for rid, n in pending.items() if n == 0), reverse=True)
        order: list[str] = []
        while stack:
            rid = stack.pop()
            order.append(rid)
            for child in sorted(self._children[rid], reverse=True):
                pending[child] -= 1
                if pending[child] == 0:
                    stack.append(child)
        if len(order) < len(self._revs):
            raise CycleDetected(sorted(set(self._revs) - set(order)))
        return order

    def __len__(self) -> int:
        return len(self._revs)

    def __iter__(self) -> Iterator[Revision]:
        return (self._revs[rid] for rid in self._order)

    def __contains__(self, revision: object) -> bool:
        return revision in self._revs

    def children(self, revision: str) -> tuple[str, ...]:
        """The ids of the revisions that revise `revision`."""
        return tuple(sorted(self._children[revision], key=self._position.__getitem__))

    # -- identifiers ---------------------------------------------------------

    def get_revision(self, ident: str) -> Revision:
        """The revision named by a full id or a unique prefix of one.

        Raises `ResolutionError` when nothing matches or when the prefix is ambiguous
        (the error lists the candidates).
        """
        found = self._revs.get(ident)
        if found is not None:
            return found
        candidates = sorted(rid for rid in self._revs if ident and rid.startswith(ident))
        if len(candidates) == 1:
            return self._revs[candidates[0]]
        if not candidates:
            hint = (
                "; give at least four characters of a partial revision id" if len(ident) < 4 else ""
            )
            raise ResolutionError(f"No such revision {ident!r}{hint}", argument=ident)
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise ResolutionError(
            f"Multiple revisions start with {ident!r}: {shown}",
            argument=ident,
            candidates=candidates,
        )

    def resolve(self, spec: str, current: Iterable[str] = ()) -> tuple[str, ...]:
        """The revision ids a target names; an empty tuple means base.

        Accepts `base`, `head` (one head, else `MultipleHeads`), `heads`, a full or
        partial id, and relative forms `+N`/`-N` (from the single current head, or
        base when nothing is applied), `head-1`, `base+2`, `REV+2`, `REV-1`.
        Walking through a branch point or a merge is ambiguous and raises.
        """
        spec = spec.strip()
        match = _RELATIVE.match(spec)
        if match is None:
            if spec == "base":
                return ()
            if spec == "heads":
                return self.heads
            if spec == "head":
                return self._single_head(spec)
            return (self.get_revision(spec).revision,)
        symbol, delta = match["symbol"], int(match["delta"])
        start: str | None
        if not symbol:
            now = self.normalize_heads(current)
            if len(now) > 1:
                raise MultipleHeads(now, spec)
            start = now[0] if now else None
        elif symbol == "base":
            start = None
        elif symbol in ("head", "heads"):
            start = next(iter(self._single_head(spec)), None)
        else:
            start = self.get_revision(symbol).revision
        return self._walk(start, delta, spec)

    def _single_head(self, spec: str) -> tuple[str, ...]:
        # With no revisions at all, head is base: upgrading an empty history does nothing.
        if len(self.heads) > 1:
            raise MultipleHeads(self.heads, spec)
        return self.heads

    def _walk(self, start: str | None, delta: int, spec: str) -> tuple[str, ...]:
        node = start  # None stands for base
        for moved in range(abs(delta)):
            nxt: tuple[str | None, ...]
            if delta > 0:
                nxt = self.bases if node is None else self.children(node)
            elif node is None:
                nxt = ()
            else:
                nxt = self._revs[node].down_revisions or (None,)
            if not nxt:
                end = "head" if delta > 0 else "base"
                raise ResolutionError(
                    f"already at {end}: {spec} has no revision to move to"
                    if moved == 0
                    else f"{spec} moves {abs(delta)} revisions, but {end} is {moved} away",
                    argument=spec,
                )
            if len(nxt) > 1:
                raise ResolutionError(
                    f"Ambiguous walk for {spec!r}: {node or 'base'} leads to "
                    f"{', '.join(str(n) for n in nxt)}; name a revision instead",
                    argument=spec,
                    candidates=[str(n) for n in nxt],
                )
            node = nxt[0]
        return () if node is None else (node,)

    # -- graph queries -------------------------------------------------------

    def ancestors(self, revisions: Iterable[str], *, inclusive: bool = True) -> set[str]:
        """Every id reachable downwards from `revisions` (including them when inclusive)."""
        return _reach(revisions, lambda rid: self._revs[rid].down_revisions, inclusive)

    def descendants(self, revisions: Iterable[str], *, inclusive: bool = True) -> set[str]:
        """Every id reachable upwards from `revisions` (including them when inclusive)."""
        return _reach(revisions, self._children.__getitem__, inclusive)

    def normalize_heads(self, heads: Iterable[str]) -> tuple[str, ...]:
        """`heads` checked to exist, without any that another one descends from, in map order."""
        ids = set(heads)
        for rid in ids:
            if rid not in self._revs:
                raise ResolutionError(f"Can't locate revision identified by {rid!r}", argument=rid)
        covered = self.ancestors(ids, inclusive=False)
        return self._ordered(ids - covered)

    def _ordered(self, ids: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(ids, key=self._position.__getitem__))

    def iterate_revisions(
        self, upper: str, lower: str, *, inclusive: bool = False
    ) -> Iterator[Revision]:
        """Revisions from `upper` down to `lower`, children before parents.

        `lower` itself is left out unless `inclusive`. Raises `ResolutionError` when
        `lower` is not an ancestor of `upper`.
        """
        tops = self.resolve(upper)
        bottoms = self.resolve(lower)
        above = self.ancestors(tops)
        for bottom in bottoms:
            if bottom not in above:
                raise ResolutionError(
                    f"Revision {bottom} is not an ancestor of {upper!r}",
                    argument=lower,
                )
        wanted = above - self.ancestors(bottoms, inclusive=not inclusive)
        for rid in reversed(self._order):
            if rid in wanted:
                yield self._revs[rid]

    # -- plans and head bookkeeping -------------------------------------------

    def upgrade_plan(self, current: Iterable[str], target: str) -> list[MigrationStep]:
        """The steps, parents first, that take the heads `current` up to `target`.

        Every revision needed by the target and not yet applied is run once; a target
        already applied gives an empty plan. Upgrading to a revision on another
        branch adds a head; running a merge revision replaces its parents by it.
        """
        if target.strip().startswith("-"):
            raise RevisionError(f"{target!r} is a downgrade target; use downgrade {target}")
        now = self.normalize_heads(current)
        needed = self.ancestors(self.resolve(target, now)) - self.ancestors(now)
        return [
            MigrationStep(self._revs[rid], Direction.UP) for rid in self._order if rid in needed
        ]

    def downgrade_plan(self, current: Iterable[str], target: str) -> list[MigrationStep]:
        """The steps, children first, that take the heads `current` down to `target`.

        Only revisions that descend from the target are undone; other branches stay.
        `base` undoes everything. A target that is not applied raises.
        """
        if target.strip().startswith("+"):
            raise RevisionError(f"{target!r} is an upgrade target; use upgrade {target}")
        now = self.normalize_heads(current)
        targets = self.resolve(target, now)
        applied = self.ancestors(now)
        for rid in targets:
            if rid not in applied:
                raise RevisionError(
                    f"Destination {rid} is not a valid downgrade target from current "
                    f"head(s) {', '.join(now) or '<base>'}"
                )
        if targets:
            undo = applied & (self.descendants(targets) - self.ancestors(targets))
        else:
            undo = applied
        return [
            MigrationStep(self._revs[rid], Direction.DOWN)
            for rid in reversed(self._order)
            if rid in undo
        ]

    def apply_step(self, heads: Iterable[str], step: MigrationStep) -> tuple[str, ...]:
        """The heads after `step` has run on a database whose heads are `heads`."""
        rid = step.revision.revision
        now = set(self.normalize_heads(heads))
        if step.direction is Direction.UP:
            below = self.ancestors([rid])
            return self._ordered({h for h in now if h not in below} | {rid})
        if rid not in now:
            raise RevisionError(f"Cannot downgrade {rid}: it is not a current head")
        now.discard(rid)
        still = self.ancestors(now)
        return self._ordered(now | {p for p in step.revision.down_revisions if p not in still})

    def stamp_heads(
        self, current: Iterable[str], target: str, *, purge: bool = False
    ) -> tuple[str, ...]:
        """The heads after stamping `target` without running anything.

        Heads on the target's own lineage are replaced by it; heads on unrelated
        branches stay, unless `purge`, which replaces everything (and accepts
        current heads that are no longer in the map).
        """
        if purge:
            return self.normalize_heads(self.resolve(target))
        now = self.normalize_heads(current)
        targets = self.resolve(target, now)
        if not targets:
            return ()
        related = self.ancestors(targets) | self.descendants(targets)
        return self.normalize_heads([h for h in now if h not in related] + list(targets))


def _reach(
    start: Iterable[str], edges: Callable[[str], Iterable[str]], inclusive: bool
) -> set[str]:
    """The ids reachable from `start` by following `edges`, `start` included if asked."""
    first = list(start)
    seen: set[str] = set(first) if inclusive else set()
    todo = [nxt for rid in first for nxt in edges(rid)]
    while todo:
        rid = todo.pop()
        if rid not in seen:
            seen.add(rid)
            todo.extend(edges(rid))
    return seen
