"""One disk budget for everything the gateway stores: usage by category, reservations, eviction.

Local models are large and the gateway must never fill the disk. `DiskBudget` accounts bytes by
`Category` against the configured limits (per category, in total) and against the real free space
of the file system, of which `min_free_bytes` is never used. Anything that is about to write a
large amount (a model download, above all) asks `DiskBudget.reserve` first; a write that cannot
fit is refused up front with `ResourceExhausted`, unless evicting least recently used, unpinned,
idle items makes room.

Key decisions:
- Transport-free and registry-free. The caller says what is on disk (`measure`) and what could go
  (`EvictionCandidate`s) and does the deleting (the `evict` callback); this module only decides.
- Reserve before writing. A reservation counts as used until it is committed or released, so
  concurrent writers cannot together overshoot: `reserve` runs plan, evictions and the hold under
  one `asyncio.Lock`. While a write is in progress its partial files are measured *and* its
  reservation still counts, which over-counts by at most the bytes already written: the budget
  errs on the side of refusing, never of filling the disk.
- After evicting, the budget measures again instead of trusting the announced sizes: a callback
  that freed less than it announced makes the reservation fail rather than overshoot.
- Eviction order is least recently used first, ties by larger size first, then id, so plans are
  deterministic. Only candidates that reduce a limit that is still short are taken (an artifact
  does not help a full models limit), and a last pass drops any chosen candidate the plan turns
  out not to need, so nothing is evicted without cause.
- `plan` and `prune_plan` are pure dry runs; only `reserve` evicts.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import shutil
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Annotated, Literal, Self

from pydantic import BeforeValidator, Field

from pluggably.core.configmodel import StrictModel
from pluggably.core.errors import ResourceExhausted

log = logging.getLogger("pluggably.storage.budget")

#: Where `StorageLimitsConfig` sits in the root config; refusals name the binding field under it.
DEFAULT_CONFIG_PATH = "storage.limits"
#: The `ErrorInfo.reason` of a refused reservation.
REASON_INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"
#: How many evictions `DiskBudget.evictions()` remembers.
EVICTION_HISTORY = 256
# Ids evicted by this budget, remembered so that a stale candidate list (taken before another
# reservation evicted the item) cannot make the item count, or be evicted, twice.
_TOMBSTONES = 4096
# proto int64: any larger size could not be reported over the API.
_MAX_BYTES = 2**63 - 1


class Category(enum.StrEnum):
    """What stored bytes are for; each category has its own accounting and optional limit."""

    MODELS = "models"
    ARTIFACTS = "artifacts"
    CACHE = "cache"
    TEMPORARY = "temporary"


@dataclass(frozen=True)
class BudgetLimits:
    """`total_bytes` caps all categories together (None: no cap); a category absent from
    `per_category` has no limit of its own; `min_free_bytes` is always left free on the file
    system."""

    total_bytes: int | None = None
    per_category: Mapping[Category, int] = field(default_factory=dict)
    min_free_bytes: int = 0

    def __post_init__(self) -> None:
        if self.total_bytes is not None and self.total_bytes < 0:
            raise ValueError("total_bytes must be >= 0")
        if any(limit < 0 for limit in self.per_category.values()):
            raise ValueError("per-category limits must be >= 0")
        if self.min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")


@dataclass(frozen=True)
class EvictionCandidate:
    """Something the caller could delete to make room. `last_used` is epoch seconds; `size_bytes`
    is what the caller believes deleting it frees (the budget re-measures after evicting)."""

    id: str
    category: Category
    size_bytes: int
    pinned: bool = False
    in_use: bool = False
    last_used: float = 0.0

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            raise ValueError(f"candidate {self.id!r}: size_bytes must be >= 0")


@dataclass(frozen=True)
class Eviction:
    """One eviction `reserve` carried out: `freed_bytes` is what the callback reported,
    `size_bytes` what the candidate announced; `reason` says which limit made it necessary."""

    id: str
    category: Category
    size_bytes: int
    freed_bytes: int
    reason: str
    at: float


@dataclass(frozen=True)
class CategoryUsage:
    """`used_bytes` = `measured_bytes` (on disk now) + `reserved_bytes` (held, not yet written)."""

    category: Category
    measured_bytes: int
    reserved_bytes: int
    limit_bytes: int | None

    @property
    def used_bytes(self) -> int:
        return self.measured_bytes + self.reserved_bytes


@dataclass(frozen=True)
class Usage:
    """A snapshot of the budget. `disk_free_bytes` is the file system's own figure; reservations
    not yet written are in `reserved_bytes`, not subtracted from it."""

    categories: Mapping[Category, CategoryUsage]
    total_limit_bytes: int | None
    min_free_bytes: int
    disk_free_bytes: int

    @property
    def used_bytes(self) -> int:
        return sum(usage.used_bytes for usage in self.categories.values())

    @property
    def reserved_bytes(self) -> int:
        return sum(usage.reserved_bytes for usage in self.categories.values())


@dataclass(frozen=True)
class BindingLimit:
    """The limit that forced evictions or a refusal.

    `subject` is the config field (e.g. `storage.limits.models_bytes`), fit for a QuotaFailure;
    `room_bytes` is what fits under it now without evicting (negative when already over), and
    `evictable_bytes` what evicting every eligible candidate would add.
    """

    subject: str
    description: str
    needed_bytes: int
    room_bytes: int
    evictable_bytes: int

    @property
    def available_bytes(self) -> int:
        return max(0, self.room_bytes + self.evictable_bytes)


@dataclass(frozen=True)
class Plan:
    """Whether `nbytes` more of `category` fit now, and at the price of which evictions.

    `fits` with an empty `to_evict`: fits as things are. `fits` with `to_evict`: fits once those
    are evicted (in that order). Not `fits`: `shortfall_bytes` are missing under `binding` even
    after every eligible eviction.
    """

    category: Category
    nbytes: int
    fits: bool
    to_evict: tuple[EvictionCandidate, ...] = ()
    shortfall_bytes: int = 0
    binding: BindingLimit | None = None

    @property
    def evict_bytes(self) -> int:
        return sum(candidate.size_bytes for candidate in self.to_evict)

    def refusal(self, note: str = "") -> ResourceExhausted:
        """The error that refuses this plan (only meaningful when it does not fit); `note` is
        appended to the message."""
        if self.binding is None:
            raise ValueError("a plan that fits has nothing to refuse")
        return ResourceExhausted(
            self.binding.description + note,
            subject=self.binding.subject,
            reason=REASON_INSUFFICIENT_STORAGE,
            metadata={
                "category": self.category.value,
                "needed_bytes": str(self.nbytes),
                "available_bytes": str(self.binding.available_bytes),
                "limit": self.binding.subject,
            },
        )


Candidates = Iterable[EvictionCandidate] | Callable[[], Iterable[EvictionCandidate]]
"""Candidates for eviction: a collection, or a function returning one. A function is called
inside `reserve`'s lock, so each reservation sees the state the previous one left."""

EvictFn = Callable[[EvictionCandidate], Awaitable[int]]
"""Deletes one candidate and returns the bytes actually freed."""


class Reservation:
    """Bytes held for a write in progress until `commit` (the files are written and `measure`
    now sees them) or `release` (the write was abandoned). Whichever comes first ends the
    reservation; later calls are no-ops. `async with` releases on exit if nothing ended it.
    A reservation dropped without either is released when garbage-collected, with a warning."""

    def __init__(self, budget: DiskBudget, token: int, category: Category, nbytes: int) -> None:
        self.category = category
        self.nbytes = nbytes
        self.committed_bytes: int | None = None
        self._token = token
        self._budget = budget
        self._finalizer = weakref.finalize(self, budget._drop_leaked, token)
        # At interpreter exit nothing leaked: the process and its reservations end together.
        self._finalizer.atexit = False

    @property
    def active(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        if self._finalizer.detach() is not None:
            self._budget._drop(self._token)

    def commit(self, actual_bytes: int) -> None:
        """Ends the reservation once `actual_bytes` were written (and are visible to `measure`)."""
        if self._finalizer.detach() is None:
            return
        self.committed_bytes = actual_bytes
        self._budget._drop(self._token)
        if actual_bytes > self.nbytes:
            log.warning(
                "a %s write used %d bytes, %d more than it reserved",
                self.category.value,
                actual_bytes,
                actual_bytes - self.nbytes,
            )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass
class _Constraint:
    """One limit checked for a plan. `room` is what fits under it now; `helps` says whether
    evicting a candidate frees bytes under it."""

    kind: Literal["category", "total", "disk"]
    subject: str
    room: int
    helps: Callable[[EvictionCandidate], bool]
    detail: str


class DiskBudget:
    """Accounts stored bytes by category against `limits` and the real free space under `root`.

    `measure` returns the bytes each category occupies on disk now (the caller knows its files;
    a missing category counts as 0). `free_bytes` defaults to the free space of the file system
    holding `root`. Candidates used within `min_idle_s` are never evicted; `eviction="none"`
    turns automatic eviction off (`prune_plan` still answers: pruning is an explicit request).
    """

    def __init__(
        self,
        root: Path,
        limits: BudgetLimits,
        *,
        measure: Callable[[], Mapping[Category, int]],
        free_bytes: Callable[[], int] | None = None,
        min_idle_s: float = 0.0,
        eviction: Literal["lru", "none"] = "lru",
        clock: Callable[[], float] = time.time,
        config_path: str = DEFAULT_CONFIG_PATH,
    ) -> None:
        self.root = root
        self.limits = limits
        self.min_idle_s = min_idle_s
        self.eviction = eviction
        self._measure = measure
        self._free_bytes = free_bytes or (lambda: _disk_free(root))
        self._clock = clock
        self._config_path = config_path
        self._lock = asyncio.Lock()
        # Reservations may be committed or released from worker threads (a download in
        # asyncio.to_thread): the counters are guarded by a plain lock.
        self._state = threading.Lock()
        self._reserved: dict[int, tuple[Category, int]] = {}
        self._tokens = itertools.count(1)
        self._evictions: deque[Eviction] = deque(maxlen=EVICTION_HISTORY)
        self._tombstones: dict[str, float] = {}

    @classmethod
    def from_config(
        cls,
        root: Path,
        config: StorageLimitsConfig,
        *,
        measure: Callable[[], Mapping[Category, int]],
        free_bytes: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        config_path: str = DEFAULT_CONFIG_PATH,
    ) -> DiskBudget:
        return cls(
            root,
            config.to_limits(),
            measure=measure,
            free_bytes=free_bytes,
            min_idle_s=config.min_idle_s,
            eviction=config.eviction,
            clock=clock,
            config_path=config_path,
        )

    # --- reading ---------------------------------------------------------------------------

    def usage(self) -> Usage:
        measured = self._measure()
        free = self._free_bytes()
        with self._state:
            reserved = dict.fromkeys(Category, 0)
            for category, nbytes in self._reserved.values():
                reserved[category] += nbytes
        return Usage(
            categories={
                category: CategoryUsage(
                    category=category,
                    measured_bytes=int(measured.get(category, 0)),
                    reserved_bytes=reserved[category],
                    limit_bytes=self.limits.per_category.get(category),
                )
                for category in Category
            },
            total_limit_bytes=self.limits.total_bytes,
            min_free_bytes=self.limits.min_free_bytes,
            disk_free_bytes=free,
        )

    def evictions(self) -> list[Eviction]:
        """Recent evictions, oldest first (at most `EVICTION_HISTORY`)."""
        return list(self._evictions)

    # --- planning --------------------------------------------------------------------------

    def plan(
        self,
        category: Category,
        nbytes: int,
        candidates: Candidates = (),
        *,
        evict: bool = True,
    ) -> Plan:
        """Whether `nbytes` more of `category` fit now; if not, which evictions make them fit.

        A dry run: nothing is evicted or held. With `evict=False` (or `eviction="none"`) the
        answer is only whether it fits as things are.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        usage = self.usage()
        constraints = self._constraints(category, usage)
        needs = [nbytes - c.room for c in constraints]
        if all(need <= 0 for need in needs):
            return Plan(category=category, nbytes=nbytes, fits=True)

        may_evict = evict and self.eviction == "lru"
        ordered = self._eligible(_materialize(candidates)) if may_evict else []
        chosen: list[EvictionCandidate] = []
        remaining = list(needs)
        for candidate in ordered:
            if all(need <= 0 for need in remaining):
                break
            helped = [
                i
                for i, c in enumerate(constraints)
                if remaining[i] > 0 and candidate.size_bytes > 0 and c.helps(candidate)
            ]
            if helped:
                chosen.append(candidate)
                for i in helped:
                    remaining[i] -= candidate.size_bytes

        if any(need > 0 for need in remaining):
            worst = max(range(len(constraints)), key=lambda i: remaining[i])
            evictable = needs[worst] - remaining[worst]
            return Plan(
                category=category,
                nbytes=nbytes,
                fits=False,
                shortfall_bytes=remaining[worst],
                binding=self._binding(
                    constraints[worst], category, nbytes, evictable, may_evict, fits=False
                ),
            )

        chosen = _drop_unneeded(chosen, constraints, needs)
        worst = max(range(len(constraints)), key=lambda i: needs[i])
        return Plan(
            category=category,
            nbytes=nbytes,
            fits=True,
            to_evict=tuple(chosen),
            binding=self._binding(
                constraints[worst],
                category,
                nbytes,
                sum(c.size_bytes for c in chosen if constraints[worst].helps(c)),
                may_evict,
                fits=True,
            ),
        )

    def prune_plan(
        self,
        categories: Iterable[Category] = (),
        *,
        target_free_bytes: int = 0,
        older_than_s: float | None = None,
        candidates: Candidates,
    ) -> list[EvictionCandidate]:
        """What PruneStorage would remove, oldest first: enough to bring each of `categories`
        (empty: all) under its limit, the total under its limit and the disk above
        `min_free_bytes`, plus `target_free_bytes` more; only candidates of those categories
        that are eligible for eviction and, with `older_than_s`, unused for longer than that.
        Best effort: when the eligible candidates do not suffice, all of them are listed."""
        if target_free_bytes < 0:
            raise ValueError("target_free_bytes must be >= 0")
        selected = set(categories) or set(Category)
        usage = self.usage()
        category_need = {
            category: max(0, usage.categories[category].used_bytes - limit)
            for category, limit in self.limits.per_category.items()
            if category in selected
        }
        total_need = 0
        if self.limits.total_bytes is not None:
            total_need = max(0, usage.used_bytes - self.limits.total_bytes)
        disk_need = max(
            0, self.limits.min_free_bytes - (usage.disk_free_bytes - usage.reserved_bytes)
        )
        general_need = max(sum(category_need.values()), total_need, disk_need) + target_free_bytes

        eligible = [
            candidate
            for candidate in self._eligible(_materialize(candidates), older_than_s=older_than_s)
            if candidate.category in selected and candidate.size_bytes > 0
        ]
        # First what only a category's own items can fix (its limit), then, from whatever is
        # left and still oldest first, what any item helps (total, disk, target).
        chosen: set[int] = set()
        freed = 0
        for index, candidate in enumerate(eligible):
            if category_need.get(candidate.category, 0) > 0:
                chosen.add(index)
                category_need[candidate.category] -= candidate.size_bytes
                freed += candidate.size_bytes
        for index, candidate in enumerate(eligible):
            if freed >= general_need:
                break
            if index not in chosen:
                chosen.add(index)
                freed += candidate.size_bytes
        return [candidate for index, candidate in enumerate(eligible) if index in chosen]

    # --- reserving -------------------------------------------------------------------------

    async def reserve(
        self,
        category: Category,
        nbytes: int,
        candidates: Candidates = (),
        *,
        evict: EvictFn | None = None,
    ) -> Reservation:
        """Holds `nbytes` of `category` for a write about to start, evicting (through `evict`,
        in plan order) when that is what makes it fit; without `evict` nothing is evicted.

        Raises `ResourceExhausted` (reason INSUFFICIENT_STORAGE, subject the binding config
        field) when it cannot fit, also when the evictions freed less than they announced.
        Reservations are serialized: two whose sum does not fit never both succeed.
        """
        async with self._lock:
            plan = self.plan(category, nbytes, candidates, evict=evict is not None)
            if not plan.fits:
                raise plan.refusal()
            if plan.to_evict and evict is not None:
                why = plan.binding.subject if plan.binding else "limits"
                evicted = plan.to_evict
                freed = 0
                for candidate in evicted:
                    freed += await self._evict_one(candidate, evict, category, nbytes, why)
                plan = self.plan(category, nbytes, evict=False)
                if not plan.fits:
                    announced = sum(candidate.size_bytes for candidate in evicted)
                    raise plan.refusal(
                        f" (after evicting {len(evicted)} item(s) that freed "
                        f"{format_bytes(freed)} of the {format_bytes(announced)} announced)"
                    )
            return self._hold(category, nbytes)

    async def _evict_one(
        self,
        candidate: EvictionCandidate,
        evict: EvictFn,
        category: Category,
        nbytes: int,
        why: str,
    ) -> int:
        reason = f"to make room for {format_bytes(nbytes)} of {category.value} under {why}"
        freed = await evict(candidate)
        now = self._clock()
        self._evictions.append(
            Eviction(
                id=candidate.id,
                category=candidate.category,
                size_bytes=candidate.size_bytes,
                freed_bytes=freed,
                reason=reason,
                at=now,
            )
        )
        self._tombstones.pop(candidate.id, None)
        self._tombstones[candidate.id] = now
        while len(self._tombstones) > _TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]
        log.info(
            "evicted %s %r: %d bytes freed (%d announced) %s",
            candidate.category.value,
            candidate.id,
            freed,
            candidate.size_bytes,
            reason,
        )
        return freed

    def _hold(self, category: Category, nbytes: int) -> Reservation:
        token = next(self._tokens)
        with self._state:
            self._reserved[token] = (category, nbytes)
        return Reservation(self, token, category, nbytes)

    def _drop(self, token: int) -> None:
        with self._state:
            self._reserved.pop(token, None)

    def _drop_leaked(self, token: int) -> None:
        with self._state:
            held = self._reserved.pop(token, None)
        if held is not None:
            log.warning(
                "a reservation of %d bytes of %s was dropped without commit or release",
                held[1],
                held[0].value,
            )

    # --- internals -------------------------------------------------------------------------

    def _eligible(
        self, candidates: Sequence[EvictionCandidate], *, older_than_s: float | None = None
    ) -> list[EvictionCandidate]:
        """Candidates the policy lets go, least recently used first (ties: larger, then id)."""
        now = self._clock()
        seen: set[str] = set()
        eligible = []
        for candidate in candidates:
            if candidate.id in seen:
                continue
            seen.add(candidate.id)
            idle = now - candidate.last_used
            if candidate.pinned or candidate.in_use or idle < self.min_idle_s:
                continue
            if older_than_s is not None and idle <= older_than_s:
                continue
            evicted_at = self._tombstones.get(candidate.id)
            if evicted_at is not None and candidate.last_used <= evicted_at:
                continue
            eligible.append(candidate)
        eligible.sort(key=lambda c: (c.last_used, -c.size_bytes, c.id))
        return eligible

    def _constraints(self, category: Category, usage: Usage) -> list[_Constraint]:
        constraints = []
        own = usage.categories[category]
        if own.limit_bytes is not None:
            constraints.append(
                _Constraint(
                    kind="category",
                    subject=f"{self._config_path}.{category.value}_bytes",
                    room=own.limit_bytes - own.used_bytes,
                    helps=lambda c: c.category == category,
                    detail=(
                        f"the {category.value} limit is {format_bytes(own.limit_bytes)} and "
                        f"{format_bytes(own.used_bytes)} are used or reserved"
                    ),
                )
            )
        if self.limits.total_bytes is not None:
            constraints.append(
                _Constraint(
                    kind="total",
                    subject=f"{self._config_path}.total_bytes",
                    room=self.limits.total_bytes - usage.used_bytes,
                    helps=lambda c: True,
                    detail=(
                        f"the total limit is {format_bytes(self.limits.total_bytes)} and "
                        f"{format_bytes(usage.used_bytes)} are used or reserved"
                    ),
                )
            )
        constraints.append(
            _Constraint(
                kind="disk",
                subject=f"{self._config_path}.min_free_bytes",
                room=usage.disk_free_bytes - usage.reserved_bytes - usage.min_free_bytes,
                helps=lambda c: True,
                detail=(
                    f"the disk has {format_bytes(usage.disk_free_bytes)} free, "
                    f"{format_bytes(usage.reserved_bytes)} are reserved by writes in progress "
                    f"and {format_bytes(usage.min_free_bytes)} must stay free"
                ),
            )
        )
        return constraints

    def _binding(
        self,
        constraint: _Constraint,
        category: Category,
        nbytes: int,
        evictable: int,
        may_evict: bool,
        *,
        fits: bool,
    ) -> BindingLimit:
        room = max(0, constraint.room)
        if fits:
            description = (
                f"{format_bytes(nbytes)} of {category.value} fit only after evicting "
                f"{format_bytes(evictable)}: {constraint.detail} ({constraint.subject})"
            )
        else:
            if not may_evict:
                evicting = ""
            elif evictable:
                evicting = f", plus {format_bytes(evictable)} from evicting idle unpinned items"
            else:
                evicting = "; nothing idle and unpinned can be evicted"
            available = max(0, constraint.room + evictable)
            description = (
                f"not enough storage for {format_bytes(nbytes)} of {category.value}: "
                f"{constraint.detail} ({constraint.subject}), so {format_bytes(room)} is "
                f"available{evicting}; needed {format_bytes(nbytes)}, available "
                f"{format_bytes(available)}"
            )
        return BindingLimit(
            subject=constraint.subject,
            description=description,
            needed_bytes=nbytes,
            room_bytes=constraint.room,
            evictable_bytes=evictable,
        )


def _materialize(candidates: Candidates) -> list[EvictionCandidate]:
    return list(candidates() if callable(candidates) else candidates)


def _drop_unneeded(
    chosen: list[EvictionCandidate], constraints: list[_Constraint], needs: list[int]
) -> list[EvictionCandidate]:
    """Removes, newest first, any chosen candidate without which every need is still met: a
    greedy walk can take an old item that a later, larger one made unnecessary."""

    def satisfied(selection: list[EvictionCandidate]) -> bool:
        return all(
            sum(c.size_bytes for c in selection if constraint.helps(c)) >= need
            for constraint, need in zip(constraints, needs, strict=True)
            if need > 0
        )

    kept = list(chosen)
    for candidate in reversed(chosen):
        without = [c for c in kept if c is not candidate]
        if satisfied(without):
            kept = without
    return kept


def _disk_free(root: Path) -> int:
    # The storage root may not exist yet (first start): ask the file system that will hold it.
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# --- sizes and config ---------------------------------------------------------------------

_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_UNIT_NAMES = "B, KB, MB, GB, TB, PB (powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024)"


def parse_size(value: object) -> object:
    """A byte count from an int or a human size ("20GiB", "500 MB", "1.5GB", "4096"); GB is
    10**9, GiB 2**30, units are case-insensitive, fractions of a byte are dropped. Anything
    else that is not a string is returned as is for pydantic to judge."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '20GiB', not a bool")
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a size: write a number with an optional unit ({_UNIT_NAMES})"
        )
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower() or "b")
    if multiplier is None:
        raise ValueError(f"unknown size unit {unit!r} in {value!r}: use {_UNIT_NAMES}")
    try:
        return int(Decimal(number) * multiplier)
    except InvalidOperation as exc:  # unreachable with the pattern above; kept as a guard
        raise ValueError(f"{value!r} is not a size") from exc


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0, le=_MAX_BYTES)]
"""A byte count in config: an int or a human size (see `parse_size`)."""


class StorageLimitsConfig(StrictModel):
    """The `storage.limits` section: limits per category and in total (None: unlimited), the
    space always left free on the file system, and how models are evicted to make room."""

    total_bytes: ByteSize | None = None
    models_bytes: ByteSize | None = None
    artifacts_bytes: ByteSize | None = None
    cache_bytes: ByteSize | None = None
    temporary_bytes: ByteSize | None = None
    min_free_bytes: ByteSize = 2**30
    #: "lru": evict least recently used, unpinned, idle models when a download needs room;
    #: "none": refuse instead (PruneStorage still removes what it is asked to).
    eviction: Literal["lru", "none"] = "lru"
    #: A model used within this many seconds is never evicted.
    min_idle_s: float = Field(300.0, ge=0)

    def to_limits(self) -> BudgetLimits:
        per_category = {
            Category.MODELS: self.models_bytes,
            Category.ARTIFACTS: self.artifacts_bytes,
            Category.CACHE: self.cache_bytes,
            Category.TEMPORARY: self.temporary_bytes,
        }
        return BudgetLimits(
            total_bytes=self.total_bytes,
            per_category={c: limit for c, limit in per_category.items() if limit is not None},
            min_free_bytes=self.min_free_bytes,
        )


def format_bytes(nbytes: int) -> str:
    """A byte count for people: "512 B", "1.50 GiB" (binary units, as limits are usually set)."""
    if abs(nbytes) < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EVICTION_HISTORY",
    "REASON_INSUFFICIENT_STORAGE",
    "BindingLimit",
    "BudgetLimits",
    "ByteSize",
    "Candidates",
    "Category",
    "CategoryUsage",
    "DiskBudget",
    "EvictFn",
    "Eviction",
    "EvictionCandidate",
    "Plan",
    "Reservation",
    "StorageLimitsConfig",
    "Usage",
    "format_bytes",
    "parse_size",
]
