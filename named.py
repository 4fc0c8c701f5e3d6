"""The one registry every kind of named thing uses (templates, tokenizer kinds, checkpoint layouts, encoder kinds,
projectors, data formats, checkpoint imports): exact names, a duplicate is an error, an unknown name lists the known
ones and suggests the closest (as PEFT's `register_peft_method`)."""

from collections.abc import Iterator
from typing import Generic, TypeVar

from align.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one `kind` ("template", "projector", …) by exact name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add `item` under `name`; a name already taken is an error."""
        if name in self._items:
            raise DuplicateNameError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def get(self, name: str, hint: str = "") -> T:
        """The item registered under exactly `name`; an unknown name is an error listing the known ones."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, str(name), self._items, hint) from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def values(self) -> list[T]:
        """Every registered item, in registration order."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
