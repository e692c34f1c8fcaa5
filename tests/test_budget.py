"""The disk budget against real files: a store on disk that `measure` walks and `evict` deletes
from, limits in bytes, and a file system of fixed capacity where free space matters."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from pydantic import ValidationError

from pluggably.core.errors import ResourceExhausted
from pluggably.storage.budget import (
    EVICTION_HISTORY,
    REASON_INSUFFICIENT_STORAGE,
    BudgetLimits,
    Category,
    DiskBudget,
    EvictionCandidate,
    StorageLimitsConfig,
    format_bytes,
    parse_size,
)

MODELS = Category.MODELS
ARTIFACTS = Category.ARTIFACTS
CACHE = Category.CACHE
NOW = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Store:
    """Items as real folders `<root>/<category>/<id>/blob`; `measure` sums what is on disk.

    `capacity` makes a small file system: free space is capacity minus what is stored, so
    evicting really frees disk and writing really uses it.
    """

    def __init__(self, root: Path, capacity: int = 10**9) -> None:
        self.root = root
        self.capacity = capacity
        self.evicted: Counter[str] = Counter()
        # What an evict callback leaves behind per id (a stale announced size, a locked file).
        self.keep_on_evict: dict[str, int] = {}

    def _dir(self, category: Category, item: str) -> Path:
        return self.root / category.value / item

    def write(self, category: Category, item: str, nbytes: int) -> None:
        folder = self._dir(category, item)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "blob").write_bytes(b"\0" * nbytes)

    def measure(self) -> Mapping[Category, int]:
        used = {}
        for category in Category:
            folder = self.root / category.value
            used[category] = (
                sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                if folder.exists()
                else 0
            )
        return used

    def free_bytes(self) -> int:
        return self.capacity - sum(self.measure().values())

    async def evict(self, candidate: EvictionCandidate) -> int:
        await asyncio.sleep(0)  # let concurrent reservations interleave here if they could
        self.evicted[candidate.id] += 1
        folder = self._dir(candidate.category, candidate.id)
        before = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder)
        kept = self.keep_on_evict.get(candidate.id, 0)
        if kept:
            self.write(candidate.category, candidate.id, kept)
        return before - kept


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "storage")


def make_budget(
    store: Store,
    clock: Clock,
    *,
    total: int | None = None,
    min_free: int = 0,
    min_idle_s: float = 0,
    **per_category: int,
) -> DiskBudget:
    limits = BudgetLimits(
        total_bytes=total,
        per_category={Category(name): limit for name, limit in per_category.items()},
        min_free_bytes=min_free,
    )
    return DiskBudget(
        store.root,
        limits,
        measure=store.measure,
        free_bytes=store.free_bytes,
        min_idle_s=min_idle_s,
        clock=clock,
    )


def candidate(
    item: str,
    size: int,
    *,
    category: Category = MODELS,
    idle_s: float = 3600,
    pinned: bool = False,
    in_use: bool = False,
) -> EvictionCandidate:
    return EvictionCandidate(
        id=item,
        category=category,
        size_bytes=size,
        pinned=pinned,
        in_use=in_use,
        last_used=NOW - idle_s,
    )


# --- fitting and the binding limit --------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "room"),
    [
        ({"models": 1000}, 400),
        ({"total": 900}, 300),
        ({"min_free": 100}, 1000 - 600 - 100),
    ],
    ids=["category", "total", "disk"],
)
async def test_exact_fit_and_one_byte_more(
    store: Store, clock: Clock, limits: dict[str, int], room: int
) -> None:
    store.capacity = 1000
    store.write(MODELS, "a", 600)
    budget = make_budget(store, clock, **limits)

    assert budget.plan(MODELS, room).fits
    over = budget.plan(MODELS, room + 1)
    assert not over.fits
    assert over.shortfall_bytes == 1

    reservation = await budget.reserve(MODELS, room)
    assert budget.usage().categories[MODELS].reserved_bytes == room
    assert not budget.plan(MODELS, 1).fits
    with pytest.raises(ResourceExhausted):
        await budget.reserve(MODELS, 1)
    reservation.release()
    assert budget.plan(MODELS, room).fits


@pytest.mark.parametrize(
    ("limits", "subject"),
    [
        ({"models": 1000, "total": 5000, "min_free": 0}, "storage.limits.models_bytes"),
        ({"models": 5000, "total": 1000, "min_free": 0}, "storage.limits.total_bytes"),
        ({"models": 5000, "total": 5000, "min_free": 1500}, "storage.limits.min_free_bytes"),
    ],
    ids=["category", "total", "disk"],
)
async def test_refusal_names_the_binding_limit(
    store: Store, clock: Clock, limits: dict[str, int], subject: str
) -> None:
    store.capacity = 2000
    store.write(MODELS, "a", 700)
    budget = make_budget(store, clock, **limits)
    # Room under the binding limit: 1000 - 700 = 300 for the two limits; the disk is already
    # 200 below its 1500 minimum (2000 - 700 free), shown as 0 available.
    with pytest.raises(ResourceExhausted) as refused:
        await budget.reserve(MODELS, 400)
    error = refused.value
    assert error.subject == subject
    assert error.reason == REASON_INSUFFICIENT_STORAGE
    assert error.metadata["needed_bytes"] == "400"
    assert error.metadata["category"] == "models"
    expected_available = 0 if "min_free" in subject else 300
    assert error.metadata["available_bytes"] == str(expected_available)
    assert subject in error.message
    assert f"needed {format_bytes(400)}, available {format_bytes(expected_available)}" in (
        error.message
    )
    assert str(store.root) not in error.message
    assert budget.usage().reserved_bytes == 0


async def test_disk_counts_reservations_of_every_category(store: Store, clock: Clock) -> None:
    store.capacity = 1000
    budget = make_budget(store, clock, min_free=200)
    held = await budget.reserve(ARTIFACTS, 500)
    assert budget.plan(MODELS, 300).fits
    assert not budget.plan(MODELS, 301).fits
    held.release()
    assert budget.plan(MODELS, 800).fits


# --- eviction -------------------------------------------------------------------------------


def test_eviction_order_is_lru_then_larger_then_id(store: Store, clock: Clock) -> None:
    store.write(MODELS, "pinned", 1000)
    budget = make_budget(store, clock, models=1000)
    candidates = [
        candidate("newest", 500, idle_s=10),
        candidate("b-tied", 200, idle_s=100),
        candidate("a-tied", 200, idle_s=100),
        candidate("big-tied", 300, idle_s=100),
        candidate("oldest", 100, idle_s=1000),
    ]
    order = ["oldest", "big-tied", "a-tied", "b-tied", "newest"]
    for need, expected in [(100, 1), (400, 2), (600, 3), (800, 4), (1300, 5)]:
        plan = budget.plan(MODELS, need, candidates)
        assert plan.fits
        assert [c.id for c in plan.to_evict] == order[:expected], need
    assert not budget.plan(MODELS, 1301, candidates).fits
    # Shuffled input, same plan: the order comes from the policy, not the caller.
    assert (
        budget.plan(MODELS, 800, list(reversed(candidates))).to_evict
        == budget.plan(MODELS, 800, candidates).to_evict
    )


def test_an_item_made_unnecessary_by_a_later_one_is_kept(store: Store, clock: Clock) -> None:
    store.write(MODELS, "x", 1000)
    budget = make_budget(store, clock, models=1000)
    plan = budget.plan(
        MODELS, 150, [candidate("old", 100, idle_s=500), candidate("new", 200, idle_s=10)]
    )
    assert [c.id for c in plan.to_evict] == ["new"]


def test_pinned_in_use_and_recent_items_are_never_evicted(store: Store, clock: Clock) -> None:
    store.write(MODELS, "x", 1000)
    budget = make_budget(store, clock, models=1000, min_idle_s=300)
    protected = [
        candidate("pinned", 900, idle_s=10_000, pinned=True),
        candidate("busy", 900, idle_s=10_000, in_use=True),
        candidate("recent", 900, idle_s=299.5),
    ]
    plan = budget.plan(MODELS, 100, protected)
    assert not plan.fits
    assert plan.binding is not None
    assert plan.binding.evictable_bytes == 0
    assert "nothing idle and unpinned can be evicted" in plan.refusal().message
    # Idle for exactly min_idle_s is idle enough.
    plan = budget.plan(MODELS, 100, [*protected, candidate("idle", 100, idle_s=300)])
    assert [c.id for c in plan.to_evict] == ["idle"]


async def test_another_category_helps_total_not_a_category_limit(
    store: Store, clock: Clock
) -> None:
    store.write(MODELS, "m", 800)
    store.write(ARTIFACTS, "art", 500)
    art = candidate("art", 500, category=ARTIFACTS, idle_s=99_999)
    model = candidate("m", 800, idle_s=10)

    by_category = make_budget(store, clock, models=1000)
    plan = by_category.plan(MODELS, 400, [art])
    assert not plan.fits
    assert plan.binding is not None and plan.binding.subject == "storage.limits.models_bytes"
    plan = by_category.plan(MODELS, 400, [art, model])
    assert [c.id for c in plan.to_evict] == ["m"]  # the older artifact does not help here

    by_total = make_budget(store, clock, total=1500)
    plan = by_total.plan(MODELS, 400, [art, model])
    assert [c.id for c in plan.to_evict] == ["art"]
    await by_total.reserve(MODELS, 400, [art, model], evict=store.evict)
    assert store.evicted == Counter({"art": 1})
    assert store.measure()[ARTIFACTS] == 0


async def test_reserve_evicts_in_plan_order_and_records_it(
    store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store.write(MODELS, "old", 300)
    store.write(MODELS, "older", 200)
    store.write(MODELS, "keep", 400)
    budget = make_budget(store, clock, models=1000)
    candidates = [candidate("old", 300, idle_s=500), candidate("older", 200, idle_s=900)]
    with caplog.at_level(logging.INFO, logger="pluggably.storage.budget"):
        reservation = await budget.reserve(MODELS, 550, candidates, evict=store.evict)
    assert [e.id for e in budget.evictions()] == ["older", "old"]
    assert [e.freed_bytes for e in budget.evictions()] == [200, 300]
    assert all("storage.limits.models_bytes" in e.reason for e in budget.evictions())
    assert all(e.at == NOW for e in budget.evictions())
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(logged) == 2 and "'older'" in logged[0] and "200 bytes freed" in logged[0]
    assert budget.usage().categories[MODELS].used_bytes == 400 + 550
    reservation.release()


async def test_reserve_without_evict_callback_never_evicts(store: Store, clock: Clock) -> None:
    store.write(MODELS, "old", 600)
    budget = make_budget(store, clock, models=1000)
    with pytest.raises(ResourceExhausted):
        await budget.reserve(MODELS, 500, [candidate("old", 600)])
    assert store.measure()[MODELS] == 600
    assert budget.evictions() == []


async def test_eviction_policy_none_refuses(store: Store, clock: Clock) -> None:
    store.write(MODELS, "old", 600)
    config = StorageLimitsConfig(models_bytes=1000, min_free_bytes=0, eviction="none")
    budget = DiskBudget.from_config(
        store.root, config, measure=store.measure, free_bytes=store.free_bytes, clock=clock
    )
    with pytest.raises(ResourceExhausted):
        await budget.reserve(MODELS, 500, [candidate("old", 600)], evict=store.evict)
    assert store.evicted == Counter()
    # Pruning is asked for explicitly, so the policy does not stop it.
    assert [
        c.id for c in budget.prune_plan(target_free_bytes=1, candidates=[candidate("old", 600)])
    ] == ["old"]


async def test_evict_freeing_less_than_announced_is_refused(store: Store, clock: Clock) -> None:
    store.write(MODELS, "stale", 500)
    store.write(MODELS, "other", 400)
    store.keep_on_evict["stale"] = 200  # the registry's size was stale: 200 bytes stay
    budget = make_budget(store, clock, models=1000)
    with pytest.raises(ResourceExhausted) as refused:
        await budget.reserve(MODELS, 500, [candidate("stale", 500)], evict=store.evict)
    assert "freed 300 B of the 500 B announced" in refused.value.message
    assert refused.value.subject == "storage.limits.models_bytes"
    assert [(e.id, e.size_bytes, e.freed_bytes) for e in budget.evictions()] == [
        ("stale", 500, 300)
    ]
    assert budget.usage().reserved_bytes == 0
    # What actually fits now is what the re-measurement says.
    assert budget.plan(MODELS, 400).fits
    assert not budget.plan(MODELS, 401).fits


async def test_evict_callback_error_holds_nothing(store: Store, clock: Clock) -> None:
    store.write(MODELS, "m", 900)
    budget = make_budget(store, clock, models=1000)

    async def failing(item: EvictionCandidate) -> int:
        raise OSError("device busy")

    with pytest.raises(OSError):
        await budget.reserve(MODELS, 500, [candidate("m", 900)], evict=failing)
    assert budget.usage().reserved_bytes == 0
    assert budget.evictions() == []


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("fresh_candidates", [False, True], ids=["stale-list", "callable"])
async def test_concurrent_reserves_only_what_fits(
    store: Store, clock: Clock, fresh_candidates: bool
) -> None:
    store.write(MODELS, "old", 500)
    store.write(MODELS, "pinned", 250)
    budget = make_budget(store, clock, models=1000)
    listed = [candidate("old", 500), candidate("pinned", 250, pinned=True)]

    def current() -> list[EvictionCandidate]:
        return [c for c in listed if (store.root / "models" / c.id).exists()]

    candidates = current if fresh_candidates else listed
    # Room 250 now and 500 more once "old" goes: three reservations of 250 fit, no fourth.
    results = await asyncio.gather(
        *(budget.reserve(MODELS, 250, candidates, evict=store.evict) for _ in range(10)),
        return_exceptions=True,
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(held) == 3 and len(refused) == 7
    assert store.evicted == Counter({"old": 1})
    assert len(budget.evictions()) == 1
    usage = budget.usage().categories[MODELS]
    assert (usage.measured_bytes, usage.reserved_bytes) == (250, 750)
    for reservation in held:
        reservation.release()  # type: ignore[union-attr]
    assert budget.usage().reserved_bytes == 0


# --- reservations ---------------------------------------------------------------------------


async def test_commit_hands_the_bytes_to_measure(store: Store, clock: Clock) -> None:
    budget = make_budget(store, clock, models=1000)
    reservation = await budget.reserve(MODELS, 600)
    assert reservation.active
    store.write(MODELS, "new", 550)
    reservation.commit(550)
    assert not reservation.active
    assert reservation.committed_bytes == 550
    usage = budget.usage().categories[MODELS]
    assert (usage.measured_bytes, usage.reserved_bytes, usage.used_bytes) == (550, 0, 550)
    reservation.release()  # after commit: no effect
    reservation.commit(1)
    assert reservation.committed_bytes == 550
    assert budget.plan(MODELS, 450).fits and not budget.plan(MODELS, 451).fits


async def test_commit_of_more_than_reserved_warns(
    store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = make_budget(store, clock)
    reservation = await budget.reserve(CACHE, 100)
    with caplog.at_level(logging.WARNING, logger="pluggably.storage.budget"):
        reservation.commit(130)
    assert "30 more than it reserved" in caplog.text


async def test_async_with_releases_on_exit_and_on_error(store: Store, clock: Clock) -> None:
    budget = make_budget(store, clock, cache=100)
    async with await budget.reserve(CACHE, 100) as reservation:
        assert budget.usage().categories[CACHE].reserved_bytes == 100
    assert not reservation.active
    with pytest.raises(RuntimeError):
        async with await budget.reserve(CACHE, 100):
            raise RuntimeError("download failed")
    assert budget.usage().reserved_bytes == 0


async def test_a_dropped_reservation_is_released(
    store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = make_budget(store, clock, cache=100)
    with caplog.at_level(logging.WARNING, logger="pluggably.storage.budget"):
        await budget.reserve(CACHE, 100)  # the result is dropped on the floor
        gc.collect()
    assert budget.usage().reserved_bytes == 0
    assert "dropped without commit or release" in caplog.text


def test_usage_reports_limits_and_real_free_space(tmp_path: Path, store: Store) -> None:
    store.write(ARTIFACTS, "a", 123)
    # The root need not exist yet: the free space is the file system's that will hold it.
    budget = DiskBudget(
        tmp_path / "not" / "yet",
        BudgetLimits(total_bytes=10_000, per_category={ARTIFACTS: 1000}, min_free_bytes=7),
        measure=store.measure,
    )
    usage = budget.usage()
    assert usage.categories[ARTIFACTS].measured_bytes == 123
    assert usage.categories[ARTIFACTS].limit_bytes == 1000
    assert usage.categories[MODELS].limit_bytes is None
    assert (usage.used_bytes, usage.total_limit_bytes, usage.min_free_bytes) == (123, 10_000, 7)
    real_free = shutil.disk_usage(tmp_path).free
    assert abs(usage.disk_free_bytes - real_free) < 64 * 2**20


async def test_eviction_history_is_bounded(store: Store, clock: Clock) -> None:
    budget = make_budget(store, clock, cache=1)
    for n in range(EVICTION_HISTORY + 3):
        store.write(CACHE, f"c{n}", 1)
        clock.now += 1  # each item is newer than the previous eviction
        item = EvictionCandidate(id=f"c{n}", category=CACHE, size_bytes=1, last_used=NOW + n)
        async with await budget.reserve(CACHE, 1, [item], evict=store.evict):
            pass
    history = budget.evictions()
    assert len(history) == EVICTION_HISTORY
    assert history[0].id == "c3" and history[-1].id == f"c{EVICTION_HISTORY + 2}"


# --- prune ----------------------------------------------------------------------------------


def test_prune_plan_brings_categories_under_their_limits(store: Store, clock: Clock) -> None:
    for item, size in [("m1", 400), ("m2", 400), ("m3", 400)]:
        store.write(MODELS, item, size)
    for item, size in [("a1", 300), ("a2", 300)]:
        store.write(ARTIFACTS, item, size)
    budget = make_budget(store, clock, models=900, artifacts=400)
    candidates = [
        candidate("m1", 400, idle_s=3000),
        candidate("m2", 400, idle_s=2000, pinned=True),
        candidate("m3", 400, idle_s=1000),
        candidate("a1", 300, category=ARTIFACTS, idle_s=500),
        candidate("a2", 300, category=ARTIFACTS, idle_s=600),
    ]
    ids = lambda plan: [c.id for c in plan]  # noqa: E731
    # Models are 300 over (m1 goes), artifacts 200 over (a2, the older, goes).
    assert ids(budget.prune_plan(candidates=candidates)) == ["m1", "a2"]
    assert ids(budget.prune_plan([MODELS], candidates=candidates)) == ["m1"]
    assert ids(budget.prune_plan([ARTIFACTS], candidates=candidates)) == ["a2"]
    # 500 more than the limits need: after m1 (400) and a2 (300), 200 of the 500 remain -> m3.
    assert ids(budget.prune_plan(target_free_bytes=500, candidates=candidates)) == [
        "m1",
        "m3",
        "a2",
    ]
    # 800 more: everything eligible goes; unused for longer than 550 s spares a1 (500 s).
    assert ids(budget.prune_plan(target_free_bytes=800, candidates=candidates)) == [
        "m1",
        "m3",
        "a2",
        "a1",
    ]
    assert ids(
        budget.prune_plan(target_free_bytes=800, older_than_s=550, candidates=candidates)
    ) == ["m1", "m3", "a2"]
    # Longer than 1000 s: m3 (exactly 1000 s) stays; best effort leaves only m1.
    assert ids(
        budget.prune_plan(target_free_bytes=800, older_than_s=1000, candidates=candidates)
    ) == ["m1"]
    # Under every limit and nothing asked for: nothing to prune.
    relaxed = make_budget(store, clock, models=5000)
    assert relaxed.prune_plan(candidates=candidates) == []
    assert ids(relaxed.prune_plan([CACHE], target_free_bytes=1, candidates=candidates)) == []


def test_prune_plan_restores_min_free(store: Store, clock: Clock) -> None:
    store.capacity = 1000
    store.write(CACHE, "c1", 300)
    store.write(CACHE, "c2", 300)
    budget = make_budget(store, clock, min_free=500)  # 400 free: 100 short
    candidates = [
        candidate("c1", 300, category=CACHE, idle_s=10),
        candidate("c2", 300, category=CACHE, idle_s=20),
    ]
    assert [c.id for c in budget.prune_plan(candidates=candidates)] == ["c2"]


# --- config and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GiB", 20 * 2**30),
        ("500MB", 500 * 10**6),
        ("500 mb", 500 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        (" 4096 ", 4096),
        ("4096B", 4096),
        ("1kib", 1024),
        ("1KB", 1000),
        ("2TiB", 2 * 2**40),
        ("0.5B", 0),
        (4096, 4096),
    ],
)
def test_sizes_parse(text: str | int, expected: int) -> None:
    assert StorageLimitsConfig(models_bytes=text).models_bytes == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20G", "unknown size unit 'G'"),
        ("20 gigs", "unknown size unit 'gigs'"),
        ("20GB/s", "is not a size"),
        ("", "is not a size"),
        ("GiB", "is not a size"),
        ("-1GiB", "is not a size"),
        ("1e9", "is not a size"),
        (True, "not a bool"),
        (-1, "greater than or equal to 0"),
        ("9000PiB", "less than or equal to"),
    ],
)
def test_bad_sizes_are_refused_clearly(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        StorageLimitsConfig(cache_bytes=value)  # type: ignore[arg-type]
    text = str(refused.value)
    assert "cache_bytes" in text
    assert message in text
    if isinstance(value, str) and "unit" in message:
        assert "GiB" in text and "GB" in text  # the message lists what is accepted


def test_config_to_limits_and_defaults() -> None:
    config = StorageLimitsConfig.model_validate(
        {"total_bytes": "100GiB", "models_bytes": "80GiB", "cache_bytes": 0}
    )
    limits = config.to_limits()
    assert limits.total_bytes == 100 * 2**30
    assert dict(limits.per_category) == {MODELS: 80 * 2**30, CACHE: 0}
    assert limits.min_free_bytes == 2**30
    assert (config.eviction, config.min_idle_s) == ("lru", 300)
    with pytest.raises(ValidationError):
        StorageLimitsConfig.model_validate({"model_bytes": "1GiB"})  # a typo is an error
    with pytest.raises(ValidationError):
        StorageLimitsConfig.model_validate({"eviction": "fifo"})
    with pytest.raises(ValidationError):
        StorageLimitsConfig.model_validate({"min_idle_s": -1})


def test_parse_size_passes_non_strings_to_pydantic() -> None:
    assert parse_size(12) == 12
    assert parse_size(None) is None
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**29) == "1.50 GiB"
