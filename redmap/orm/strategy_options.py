"""Loader options per query: `selectinload`, `lazyload`, `raiseload`, `defaultload`.

Built by user code, stored by `Select.options()` and `Session.get(..., options=)`,
turned into a `LoadTree` by `build_tree` when the statement runs, and applied by
`strategies.selectin_for` (right after the load) and `strategies.load_relationship_steps`
(a later lazy load of an object the statement returned). As in SQLAlchemy, an option
overrides a relationship's mapped `lazy=` for the objects one statement returns only;
it is data until then, so building one touches no server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exc import InvalidRequestError
from .attributes import RelationshipAttribute

if TYPE_CHECKING:
    from .mapper import Mapper
    from .relationships import RelationshipProperty

__all__ = [
    "Load",
    "LoadNode",
    "LoadTree",
    "build_tree",
    "defaultload",
    "lazyload",
    "raiseload",
    "selectinload",
]


@dataclass(frozen=True)
class _Step:
    """One link of a chain: a relationship and the loader asked for it (None: its own)."""

    attribute: RelationshipAttribute
    strategy: str | None
    sql_only: bool = False


def _attribute(attr: Any, name: str) -> RelationshipAttribute:
    if not isinstance(attr, RelationshipAttribute):
        raise InvalidRequestError(
            f"{name}() takes a relationship read from its class, like "
            f"{name}(Author.books); got {attr!r}"
        )
    return attr


class Load:
    """A chain of loader settings along a relationship path (`selectinload(A.b).raiseload(B.c)`).

    Each method adds one link below the last one and returns a new chain; the links
    are checked against the mapping (each relationship must start where the previous
    one leads) when the statement runs, once every class is configured.
    """

    __slots__ = ("steps",)

    def __init__(self, steps: tuple[_Step, ...] = ()) -> None:
        self.steps = steps

    def _then(self, step: _Step) -> Load:
        return Load((*self.steps, step))

    def selectinload(self, attr: Any) -> Load:
        """Load `attr` for every object reached so far, together (2 round trips per level)."""
        return self._then(_Step(_attribute(attr, "selectinload"), "selectin"))

    def lazyload(self, attr: Any) -> Load:
        """Load `attr` on first access of each object (the `lazy="select"` behaviour)."""
        return self._then(_Step(_attribute(attr, "lazyload"), "select"))

    def raiseload(self, attr: Any, *, sql_only: bool = False) -> Load:
        """Raise `InvalidRequestError` on access to `attr` while it is not loaded.

        With `sql_only=True`, a many-to-one whose target is already in the session is
        still filled from it (no I/O needed); only a load that needs Redis raises.
        """
        return self._then(_Step(_attribute(attr, "raiseload"), "raise", sql_only))

    def defaultload(self, attr: Any) -> Load:
        """Keep `attr`'s mapped loader; used to reach options further down the chain."""
        return self._then(_Step(_attribute(attr, "defaultload"), None))

    def __repr__(self) -> str:
        links = ".".join(f"{s.strategy or 'default'}load({s.attribute!r})" for s in self.steps)
        return f"<Load {links}>"


def selectinload(attr: Any) -> Load:
    """`select(A).options(selectinload(A.b))`: load `A.b` of every returned `A` together,
    in 2 round trips whatever their number (SQLAlchemy's `selectinload`)."""
    return Load().selectinload(attr)


def lazyload(attr: Any) -> Load:
    """`select(A).options(lazyload(A.b))`: load `A.b` on first access, whatever its mapped
    `lazy=` (SQLAlchemy's `lazyload`)."""
    return Load().lazyload(attr)


def raiseload(attr: Any, *, sql_only: bool = False) -> Load:
    """`select(A).options(raiseload(A.b))`: accessing `A.b` unloaded raises instead of
    loading, so a forgotten `selectinload` shows up as an error, not as N round trips."""
    return Load().raiseload(attr, sql_only=sql_only)


def defaultload(attr: Any) -> Load:
    """`defaultload(A.b).selectinload(B.c)`: `A.b` keeps its mapped loader, `B.c` of the
    `B`s it loads is selectin-loaded."""
    return Load().defaultload(attr)


@dataclass
class LoadNode:
    """What the options say about one relationship on a path: its loader (None: the
    mapped one), and the options for the objects it leads to."""

    strategy: str | None = None
    sql_only: bool = False
    children: LoadTree = field(default_factory=dict)


#: Options by relationship, for the objects of one model on a path.
LoadTree = dict["RelationshipProperty", LoadNode]


def build_tree(mapper: Mapper[Any], options: Iterable[Load]) -> LoadTree:
    """Merge `options` into one tree rooted at `mapper`, checking every path.

    When two options set the same relationship on the same path, the later one wins
    (its sub-options merge). A relationship that does not start where the path is
    (`selectinload(A.b).selectinload(C.d)` with `B` not `C`) raises
    `InvalidRequestError` naming both.
    """
    tree: LoadTree = {}
    for option in options:
        if not isinstance(option, Load):
            raise InvalidRequestError(
                f"options() takes loader options (selectinload(...), lazyload(...), "
                f"raiseload(...), defaultload(...)); got {option!r}"
            )
        level, at = tree, mapper
        for step in option.steps:
            prop = step.attribute.prop
            if prop.parent is not at:
                raise InvalidRequestError(
                    f"loader option {option!r}: {step.attribute!r} is not a relationship "
                    f"of {at.name}, where the path is at that point"
                )
            node = level.setdefault(prop, LoadNode())
            if step.strategy is not None:
                node.strategy, node.sql_only = step.strategy, step.sql_only
            level = node.children
            at = _target_mapper(prop)
    return tree


def _target_mapper(prop: RelationshipProperty) -> Mapper[Any]:
    from .mapper import mapper_of

    return mapper_of(prop.target)
