"""Small value records for the spec's structures as vhdkit holds them (the footer, the dynamic
header and its parent locators, the layout step's findings, the parent search's results).

They were dataclasses; ``dataclasses`` imports ``inspect`` (with ``ast``, ``dis`` and
``tokenize``) and compiles each class's ``__init__``, ``__repr__`` and ``__eq__`` from source
when the class is made: together about 15 ms of every ``vhd`` command's start-up (``python -X
importtime``: 7-9 ms for the import, the rest in the defining modules).  A record names its
fields in order in ``_fields`` (its ``__slots__`` too) with their annotations, and writes a
typed ``__init__`` that hands the values, in that order, to :func:`fill`; :class:`Record` then
gives what the dataclass gave: equality between records of the same class, a ``repr`` naming
the fields, and :meth:`Record.replace`.  :class:`FrozenRecord` adds the frozen dataclass's hash
and refuses assignment after ``__init__``.

``TYPE_CHECKING = False`` (here and in the modules a short command imports) stands for
``typing.TYPE_CHECKING``, which type checkers treat alike: importing typing costs about 4 ms.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see above)
if TYPE_CHECKING:
    from typing import Any, ClassVar, NoReturn, Self


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record (dataclasses' FrozenInstanceError)."""


class Record:
    """Equality, ``repr`` and ``replace`` from the fields in ``__slots__``; unhashable, as a
    mutable dataclass is."""

    __slots__ = ()
    # The fields in order (a record sets `__slots__ = _fields`): equality, repr, replace and
    # fill go by it.
    _fields: ClassVar[tuple[str, ...]] = ()
    # Fields left out of repr (a dataclass field(repr=False)).
    _hidden: ClassVar[frozenset[str]] = frozenset()

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __repr__(self) -> str:
        shown = [f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._hidden]
        return f"{type(self).__qualname__}({', '.join(shown)})"

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        # copy and pickle rebuild through __init__ (a frozen record refuses setattr), as the
        # frozen dataclasses' own __getstate__/__setstate__ let them
        return type(self), self._values()

    def _asdict(self) -> dict[str, Any]:
        """The fields by name, in order (``dataclasses.asdict`` without its deep copy; named as
        namedtuple's, apart from the ``as_dict`` that reports define for their JSON)."""
        return {name: getattr(self, name) for name in self._fields}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field name -> value), like ``dataclasses.replace``."""
        return type(self)(**(self._asdict() | changes))


class FrozenRecord(Record):
    """A record whose fields do not change after ``__init__`` (a frozen dataclass): hashable."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenRecordError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenRecordError(f"cannot delete field {name!r}")


_set = object.__setattr__


def fill(record: Record, *values: object) -> None:
    """Set the record's fields, in field order, to ``values`` (from its ``__init__``)."""
    for name, value in zip(record._fields, values, strict=True):
        _set(record, name, value)
