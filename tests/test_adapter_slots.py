"""Placement of adapters in the device pool's pages (server/lora/slots.py): aligned blocks,
LRU eviction of unpinned adapters only, and the O(1) room check against a brute-force one."""

import random

import pytest

from server.lora.slots import SlotTable, block_pages


def test_blocks_are_aligned_powers_of_two():
    table = SlotTable(8, max_block=4)
    assert [block_pages(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert table.acquire("a", 1)[:2] == (0, True)
    assert table.acquire("b", 3)[:2] == (4, True)  # a block of 4, aligned: pages 4..7
    assert table.acquire("c", 2)[:2] == (2, True)  # a block of 2, aligned: pages 2..3
    assert table.acquire("d", 1)[:2] == (1, True)
    assert table.residents() == [(0, "a"), (1, "d"), (2, "c"), (4, "b")]
    assert not table.can_acquire("e", 1) and not table.can_acquire("e", 4)
    with pytest.raises(RuntimeError, match="pinned"):
        table.acquire("e", 1)
    with pytest.raises(ValueError, match="largest block"):
        table.can_acquire("f", 5)


def test_eviction_takes_the_least_recently_used_idle_adapters_and_never_a_pinned_one():
    table = SlotTable(4, max_block=2)
    for name in "abcd":
        table.acquire(name, 1)
    for name in "bdac":  # idle, least recent first: b, d, a, c
        table.release(name)
    table.acquire("a", 1)  # in use again
    assert table.acquire("e", 1) == (1, True, ["b"])
    # a block of two: (0, 1) holds pinned a, (2, 3) holds idle c and d: both go
    assert table.acquire("f", 2) == (2, True, ["c", "d"])
    assert table.residents() == [(0, "a"), (1, "e"), (2, "f")]
    assert table.acquire("a", 1) == (0, False, [])  # resident: no load
    with pytest.raises(RuntimeError, match="in use"):
        table.evict("a")


@pytest.mark.parametrize("seed", range(5))
def test_room_check_and_placement_stay_consistent_under_random_use(seed):
    rng = random.Random(seed)
    table = SlotTable(16, max_block=4)
    pins: dict[str, int] = {}
    for step in range(600):
        name, pages = f"x{rng.randrange(30)}", rng.choice([1, 1, 2, 3, 4])
        action = rng.random()
        if action < 0.5:
            pinned_pages = {p for a, n in pins.items() if n for p in _pages_of(table, a)}
            size = block_pages(pages)
            room = any(not pinned_pages & set(range(k, k + size)) for k in range(0, 16, size))
            resident = table.slot_of(name) is not None
            assert table.can_acquire(name, pages) == (resident or room)
            if resident or room:
                first, needs_load, evicted = table.acquire(name, pages)
                assert needs_load != resident and all(not pins.get(v) for v in evicted)
                assert first % block_pages(pages) == 0 or resident
                pins[name] = pins.get(name, 0) + 1
        elif action < 0.85 and any(pins.values()):
            held = rng.choice([a for a, n in pins.items() if n])
            table.release(held)
            pins[held] -= 1
        elif not pins.get(name):
            table.evict(name)
        owners = [a for first, a in table.residents() for _ in _pages_of(table, a)]
        assert len(owners) == len(set(p for _, a in table.residents() for p in _pages_of(table, a)))  # no overlap
        assert all(table.slot_of(a) is not None for a, n in pins.items() if n)  # pinned stay resident


def _pages_of(table: SlotTable, name: str) -> range:
    first, size = table._place[name]
    return range(first, first + size)
