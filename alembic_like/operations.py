"""Operations as data and the `op` object revision functions receive; owns
`MigrateOperation` and `Operations`. Called by revision files (through `op`), by
`runtime` (one `Operations` per step) and by hosts, which register operations here.

An operation is a plain object describing one change; `Operations` turns a method
call such as `op.add_field(...)` into that object and hands it to the implementation
the host registered for its class, or, while collecting, only records it. Collecting
is what dry runs and the pre-downgrade reversibility check use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

from alembic_like.exc import CommandError, IrreversibleError

__all__ = ["MigrateOperation", "Operations"]

OpT = TypeVar("OpT", bound="MigrateOperation")
ImplT = TypeVar("ImplT", bound=Callable[..., Any])

_OP_METHOD = "_alembic_like_operation"  # marks methods made by register_operation
_Table = dict[type["MigrateOperation"], Callable[..., Any]]


class MigrateOperation:
    """Base of every operation: one change, described as data.

    Subclasses (usually dataclasses) override `reverse()` to return the operation
    that undoes them; that is what makes `op.reverse_of(upgrade)` a free downgrade.
    The default has no reverse and raises `IrreversibleError`.
    """

    def reverse(self) -> MigrateOperation:
        """The operation that undoes this one; raises `IrreversibleError` by default."""
        name = type(self).__name__
        raise IrreversibleError(
            f"{name} cannot be reversed; write the revision's downgrade() by hand",
            operation=name,
        )

    @property
    def is_reversible(self) -> bool:
        """True when `reverse()` returns an operation instead of raising."""
        try:
            self.reverse()
        except IrreversibleError:
            return False
        return True

    def describe(self) -> str:
        """One line for dry runs and logs; the repr unless a subclass says better."""
        return repr(self)


class Operations:
    """The `op` passed to `upgrade(op)` and `downgrade(op)`.

    Hosts attach operation classes as methods with `register_operation(name)` and
    their implementations with `implementation_for(OpClass)`; both may be used on a
    subclass to keep a host's operations to itself. `context` is whatever the host
    needs at run time (a client, a `Messaging`); alembic_like never looks inside.

    >>> class MyOperations(Operations): ...
    >>> @MyOperations.register_operation("say")
    ... class Say(MigrateOperation):
    ...     def __init__(self, text: str) -> None:
    ...         self.text = text
    >>> @MyOperations.implementation_for(Say)
    ... def _say(operations: Operations, operation: Say) -> str:
    ...     return operation.text.upper()
    >>> MyOperations().say("hi")
    'HI'
    """

    _implementations: ClassVar[_Table] = {}

    def __init__(self, context: Any = None) -> None:
        self.context = context
        self._collected: list[MigrateOperation] | None = None

    @classmethod
    def register_operation(cls, name: str) -> Callable[[type[OpT]], type[OpT]]:
        """Class decorator: `op.<name>(*args, **kw)` builds the operation and invokes it."""

        def register(op_class: type[OpT]) -> type[OpT]:
            existing = getattr(cls, name, None)
            if existing is not None and not getattr(existing, _OP_METHOD, False):
                raise CommandError(
                    f"Cannot register operation {name!r}: {cls.__name__} already has it"
                )

            def method(self: Operations, *args: Any, **kwargs: Any) -> Any:
                return self.invoke(op_class(*args, **kwargs))

            method.__name__ = name
            method.__qualname__ = f"{cls.__name__}.{name}"
            method.__doc__ = op_class.__doc__
            setattr(method, _OP_METHOD, True)
            setattr(cls, name, method)
            return op_class

        return register

    @classmethod
    def implementation_for(cls, op_class: type[MigrateOperation]) -> Callable[[ImplT], ImplT]:
        """Decorator registering `fn(operations, operation)` as how `op_class` runs."""

        def register(fn: ImplT) -> ImplT:
            if "_implementations" not in cls.__dict__:
                cls._implementations = {}
            cls._implementations[op_class] = fn
            return fn

        return register

    @property
    def collecting(self) -> bool:
        """True while operations are recorded instead of run (dry run, checks)."""
        return self._collected is not None

    def invoke(self, operation: MigrateOperation) -> Any:
        """Run `operation` through its implementation, or record it while collecting.

        Returns the implementation's result; `None` while collecting.
        """
        if self._collected is not None:
            self._collected.append(operation)
            return None
        return self._implementation(type(operation))(self, operation)

    def _implementation(self, op_class: type[MigrateOperation]) -> Callable[..., Any]:
        for op_kind in op_class.__mro__:
            for kind in type(self).__mro__:
                table = cast(_Table, kind.__dict__.get("_implementations", {}))
                if op_kind in table:
                    return table[op_kind]
        raise CommandError(
            f"No implementation of {op_class.__name__} is registered for {type(self).__name__}"
        )

    def collect(self, fn: Callable[[Operations], object]) -> list[MigrateOperation]:
        """The operations `fn(self)` would invoke, recorded without running any.

        Implementations are not called, so return values seen by `fn` are `None`;
        anything `fn` does besides calling `op` methods does happen.
        """
        outer = self._collected
        collected: list[MigrateOperation] = []
        self._collected = collected
        try:
            fn(self)
        finally:
            self._collected = outer
        return collected

    def reverse_of(self, fn: Callable[[Operations], object]) -> None:
        """Invoke the reverses of `fn`'s operations, last first: a free downgrade.

        Every reverse is computed before any is invoked, so an irreversible
        operation raises `IrreversibleError` with nothing undone.
        """
        undo = [operation.reverse() for operation in reversed(self.collect(fn))]
        for operation in undo:
            self.invoke(operation)
