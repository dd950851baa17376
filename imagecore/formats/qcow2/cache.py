"""Bounded LRU caches of qcow2 metadata tables (L2 tables, refcount blocks) with dirty tracking.

The cache never writes anything itself: it drops clean entries when over budget and tells its owner when
dirty ones keep it over budget, so that the owner writes them back in the order crash safety needs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_BUDGET = 32 * 1024 * 1024


class TableCache(Generic[T]):
    """Host offset -> decoded table, least recently used first."""

    def __init__(self, entry_bytes: int, budget: int = DEFAULT_BUDGET) -> None:
        self.entry_bytes = entry_bytes
        self.capacity = max(4, budget // max(1, entry_bytes))
        self._d: OrderedDict[int, T] = OrderedDict()
        self.dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, offset: int) -> bool:
        return offset in self._d

    def peek(self, offset: int) -> T | None:
        """Look up without touching the LRU order (for hot read paths)."""
        return self._d.get(offset)

    def get(self, offset: int) -> T | None:
        t = self._d.get(offset)
        if t is not None:
            self._d.move_to_end(offset)
        return t

    def put(self, offset: int, table: T, *, dirty: bool = False) -> None:
        self._d[offset] = table
        self._d.move_to_end(offset)
        if dirty:
            self.dirty.add(offset)
        self.shrink()

    def mark_dirty(self, offset: int, table: T) -> None:
        """Record a change to ``table``; puts it back if it was dropped while its owner held it."""
        if offset not in self._d:
            self._d[offset] = table
        self.dirty.add(offset)

    def mark_clean(self, offset: int) -> None:
        self.dirty.discard(offset)

    def drop(self, offset: int) -> None:
        self._d.pop(offset, None)
        self.dirty.discard(offset)

    def over_budget(self) -> bool:
        return len(self._d) > self.capacity

    def shrink(self) -> None:
        """Drop clean entries, oldest first, until within budget (dirty ones stay)."""
        if len(self._d) <= self.capacity:
            return
        # the most recent entry stays: its caller is about to use (and maybe change) it
        for off in list(self._d)[:-1]:
            if len(self._d) <= self.capacity:
                break
            if off not in self.dirty:
                del self._d[off]

    def dirty_items(self) -> list[tuple[int, T]]:
        return [(off, self._d[off]) for off in sorted(self.dirty) if off in self._d]

    def clear(self) -> None:
        self._d.clear()
        self.dirty.clear()
