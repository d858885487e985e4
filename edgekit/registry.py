"""One lookup helper for every table of named things: recipes, formats, device profiles,
model families.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterable, Iterator, TypeVar

from edgekit.errors import EdgekitError, InputError

T = TypeVar("T")

class Registry(Generic[T]):
    """An explicit, ordered table of named objects.

    Duplicate names fail at construction and unknown names fail at lookup, each with
    the caller's error type and the list of known names (a bare `dict[...]` inside
    `try/except KeyError` hides both).
    """

    def __init__(self, kind: str, items: Iterable[T], *, error: type[EdgekitError] = InputError,
                 key: Callable[[T], str] = lambda item: item.name, where: str = "") -> None:
        self.kind = kind
        self._error = error
        self._where = where
        self._items: dict[str, T] = {}
        for item in items:
            name = key(item)
            if name in self._items:
                raise error(f"{where}duplicate {kind} {name!r}")
            self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self._error(
                f"{self._where}unknown {self.kind} {name!r}; choose one of: {', '.join(self._items)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
