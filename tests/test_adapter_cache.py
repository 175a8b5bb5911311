"""The tiered adapter cache over a real store of peft-saved adapters and a real (tiny, CPU) pool.

The oracle for weights is the safetensors file peft wrote, read directly (not our parser), and the
LoraConfig's alpha / r. Timing is controlled by gating `store.open_verified` (every disk read of an
adapter goes through it); every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load as load_safetensors  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from server.lora.cache import AdapterCache, AdapterLoadError, AdapterState  # noqa: E402
from server.lora.peft import load_peft_adapter  # noqa: E402
from server.lora.pool import PROJECTION_SLICES, AdapterPool  # noqa: E402
from server.lora.store import AdapterStore  # noqa: E402
from server.model.config import ModelConfig  # noqa: E402
from server.model.llama import LlamaModel  # noqa: E402
from tests.peft_helpers import save_random_tiny_adapter  # noqa: E402

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128)
MODEL = ModelConfig.from_hf_dict(LLAMA.to_dict())
MAX_RANK = 16
SMALL = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
LORAS = {"a": (SMALL, 1), "b": (SMALL, 2), "c": (SMALL, 3),
         "big": (dict(r=16, lora_alpha=32, target_modules="all-linear"), 4)}
WAIT_S = 10.0
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+_proj)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class Saved:
    config: bytes
    weights: bytes
    expected: dict  # (layer, module) -> (A, B, scale), straight from the file and LoraConfig


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Saved]:
    out = {}
    for name, (kwargs, seed) in LORAS.items():
        directory = save_random_tiny_adapter(LLAMA, kwargs, seed, tmp_path_factory.mktemp(name))
        weights = (directory / "adapter_model.safetensors").read_bytes()
        tensors: dict = {}
        for key, tensor in load_safetensors(weights).items():
            layer, module, which = _KEY.fullmatch(key).groups()
            tensors.setdefault((int(layer), module), {})[which] = tensor
        scale = kwargs["lora_alpha"] / kwargs["r"]
        expected = {k: (t["A"], t["B"], scale) for k, t in tensors.items()}
        out[name] = Saved((directory / "adapter_config.json").read_bytes(), weights, expected)
    return out


@pytest.fixture(scope="module")
def small_nbytes(adapters) -> int:
    return load_peft_adapter(adapters["a"].config, adapters["a"].weights, MODEL, max_rank=MAX_RANK).nbytes


def validate(config: bytes, weights: bytes):
    return load_peft_adapter(config, weights, MODEL, max_rank=MAX_RANK)


@dataclass
class Rig:
    cache: AdapterCache
    model: LlamaModel
    store: AdapterStore
    reads: list  # (customer, version) of every store.open_verified call


@pytest.fixture
def make_rig(tmp_path, adapters):
    caches = []

    def make(customers=("a", "b", "c"), *, num_slots=2, host_bytes=10**8, **kwargs) -> Rig:
        store = AdapterStore(tmp_path / "store")
        for name in customers:
            store.put(name, adapters[name].config, adapters[name].weights, validate)
        torch.manual_seed(0)
        model = LlamaModel(MODEL)
        pool = AdapterPool(model, max_adapters=num_slots, max_rank=MAX_RANK)
        cache = AdapterCache(store, pool, MODEL, host_bytes=host_bytes, max_rank=MAX_RANK, dtype=torch.float32,
                             **kwargs)
        caches.append(cache)
        reads = []
        open_verified = store.open_verified

        def counted(record):
            reads.append((record.customer_id, record.version))
            return open_verified(record)

        store.open_verified = counted
        return Rig(cache, model, store, reads)

    yield make
    for cache in caches:
        cache.close()


def wait_ready(cache: AdapterCache, key, timeout: float = WAIT_S) -> str:
    """Poll prepare() until the load settles; "ready" or "failed"."""
    deadline = time.monotonic() + timeout
    while (answer := cache.prepare(key)) == "loading":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} still loading after {timeout} s")
        time.sleep(0.002)
    return answer


def assert_slot_holds(model: LlamaModel, slot: int, expected: dict) -> None:
    """Every projection slice of the slot equals the file's A, B and scale, zero-padded; the rest is zero."""
    for layer, name, proj in model.projections():
        for i, module in enumerate(PROJECTION_SLICES[name]):
            a, b, scale = proj.lora.lora_a[i][slot], proj.lora.lora_b[i][slot], proj.lora.scales[slot, i]
            if (layer, module) not in expected:
                assert not a.any() and not b.any() and scale == 0, (layer, module)
                continue
            want_a, want_b, want_scale = expected[(layer, module)]
            r = want_a.shape[0]
            assert torch.equal(a[:r], want_a) and torch.equal(b[:, :r], want_b), (layer, module)
            assert not a[r:].any() and not b[:, r:].any()
            assert scale.item() == pytest.approx(want_scale)


A, B, C, BIG = ("a", 1), ("b", 1), ("c", 1), ("big", 1)


def test_pinned_slot_holds_the_files_weights_and_stats_count(make_rig, adapters):
    rig = make_rig()
    cache = rig.cache
    assert cache.state(A) is AdapterState.ON_DISK
    assert cache.prepare(A) == "loading"
    assert wait_ready(cache, A) == "ready" and cache.state(A) is AdapterState.IN_HOST
    slot = cache.pin(A)
    assert cache.state(A) is AdapterState.ON_DEVICE and cache.resident_keys() == [A]
    assert_slot_holds(rig.model, slot, adapters["a"].expected)
    assert cache.prepare(A) == "ready" and cache.pin(A) == slot  # a second user shares the slot
    cache.unpin(A)
    cache.unpin(A)

    stats = cache.stats()
    assert (stats.host.queries, stats.host.hits) == (2, 1)  # the miss that started the load, then the hit
    assert (stats.device.queries, stats.device.hits) == (3, 1)
    assert stats.loads == {"disk": 1, "host": 1} and all(s > 0 for s in stats.load_seconds.values())
    nbytes = sum(a.nbytes + b.nbytes for a, b, _ in adapters["a"].expected.values())
    assert (stats.host.resident, stats.host.resident_bytes) == (1, nbytes)
    assert (stats.device.resident, stats.device.resident_bytes) == (1, nbytes)
    assert stats.load_failures == 0 and stats.loading == 0 and rig.reads == [A]


def test_host_tier_evicts_least_recently_used_within_its_byte_budget(make_rig, small_nbytes):
    rig = make_rig(host_bytes=int(2.5 * small_nbytes))  # room for two
    cache = rig.cache
    assert wait_ready(cache, A) == wait_ready(cache, B) == "ready"
    assert cache.prepare(A) == "ready"  # A is now the most recent
    assert wait_ready(cache, C) == "ready"
    states = {k: cache.state(k) for k in (A, B, C)}
    assert states == {A: AdapterState.IN_HOST, B: AdapterState.ON_DISK, C: AdapterState.IN_HOST}
    stats = cache.stats().host
    assert (stats.evictions, stats.resident, stats.resident_bytes) == (1, 2, 2 * small_nbytes)

    assert wait_ready(cache, B) == "ready"  # read again; evicts A, now the least recent
    assert cache.state(A) is AdapterState.ON_DISK and rig.reads == [A, B, C, B]


def test_device_tier_evicts_least_recent_unpinned_slot(make_rig, adapters):
    rig = make_rig(num_slots=2)
    cache = rig.cache
    for key in (A, B, C):
        assert wait_ready(cache, key) == "ready"
    slot_a, slot_b = cache.pin(A), cache.pin(B)
    cache.unpin(B)  # B idle first: the least recent
    cache.unpin(A)
    assert cache.can_pin(C)
    assert cache.pin(C) == slot_b
    assert sorted(cache.resident_keys()) == [A, C]
    assert cache.state(B) is AdapterState.IN_HOST  # device eviction leaves the host copy
    assert_slot_holds(rig.model, slot_b, adapters["c"].expected)  # overwritten completely
    assert_slot_holds(rig.model, slot_a, adapters["a"].expected)
    assert cache.stats().device.evictions == 1


def test_in_use_adapter_is_never_evicted_even_under_pressure(make_rig, adapters, small_nbytes):
    rig = make_rig(num_slots=2, host_bytes=int(1.5 * small_nbytes))  # the host tier holds one
    cache = rig.cache
    slots = {}
    for key in (A, B):
        assert wait_ready(cache, key) == "ready"
        slots[key] = cache.pin(key)
    assert wait_ready(cache, C) == "ready"  # evicts B from host; A went when B arrived
    assert cache.state(A) is cache.state(B) is AdapterState.ON_DEVICE
    assert not cache.can_pin(C)
    with pytest.raises(RuntimeError, match="pinned"):
        cache.pin(C)
    assert cache.prepare(A) == "ready"  # host eviction never touches the device copy
    for key, name in ((A, "a"), (B, "b")):
        assert_slot_holds(rig.model, slots[key], adapters[name].expected)

    cache.unpin(B)
    assert cache.can_pin(C)
    assert cache.pin(C) == slots[B]
    assert_slot_holds(rig.model, slots[A], adapters["a"].expected)
    assert_slot_holds(rig.model, slots[B], adapters["c"].expected)


def test_single_flight_load_does_not_block_other_adapters(make_rig):
    rig = make_rig(loader_threads=2)
    cache = rig.cache
    gate, a_reading = threading.Event(), threading.Event()
    open_verified = rig.store.open_verified

    def gated(record):
        if record.customer_id == "a":
            a_reading.set()
            assert gate.wait(WAIT_S)
        return open_verified(record)

    rig.store.open_verified = gated
    start, answers = threading.Barrier(16), []

    def ask():
        start.wait(WAIT_S)
        answers.append(cache.prepare(A))

    try:
        threads = [threading.Thread(target=ask) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert answers == ["loading"] * 16
        assert a_reading.wait(WAIT_S)
        assert wait_ready(cache, B) == "ready"  # another tenant's load passes the stuck one
        assert cache.state(A) is AdapterState.LOADING and cache.stats().loading == 1
    finally:
        gate.set()
    assert wait_ready(cache, A) == "ready"
    assert sorted(rig.reads) == [A, B]  # one read of A for sixteen asks
    assert cache.stats().loads["disk"] == 2


def test_replaced_adapter_old_sequence_keeps_old_weights(make_rig, adapters):
    rig = make_rig(customers=("a",), num_slots=2)
    cache, store = rig.cache, rig.store
    v1, v2 = ("a", 1), ("a", 2)
    assert wait_ready(cache, v1) == "ready"
    old_slot = cache.pin(v1)  # a sequence running on version 1
    assert store.put("a", adapters["b"].config, adapters["b"].weights, validate).version == 2
    assert wait_ready(cache, v2) == "ready"
    new_slot = cache.pin(v2)
    assert new_slot != old_slot
    assert_slot_holds(rig.model, old_slot, adapters["a"].expected)
    assert_slot_holds(rig.model, new_slot, adapters["b"].expected)

    assert cache.release_old_versions("a", 2) == []  # v1 still pinned: its files stay
    assert store.get_version("a", 1).version == 1 and cache.state(v1) is AdapterState.ON_DEVICE
    assert_slot_holds(rig.model, old_slot, adapters["a"].expected)
    cache.unpin(v1)  # the old sequence finishes
    assert cache.release_old_versions("a", 2) == [1]
    assert cache.resident_keys() == [v2] and cache.state(v1) is AdapterState.ON_DISK
    assert wait_ready(cache, v1) == "failed" and "no version 1" in cache.error(v1)
    assert cache.prepare(v2) == "ready"


def test_forget_drops_copies_but_not_a_pinned_one(make_rig, adapters):
    rig = make_rig(customers=("a", "b"), num_slots=2)
    cache, store = rig.cache, rig.store
    assert wait_ready(cache, A) == "ready"
    slot = cache.pin(A)
    store.put("a", adapters["c"].config, adapters["c"].weights, validate)
    assert wait_ready(cache, ("a", 2)) == wait_ready(cache, B) == "ready"
    store.delete("a")
    assert cache.forget("a") == [2]
    assert cache.state(("a", 2)) is AdapterState.ON_DISK and cache.state(A) is AdapterState.ON_DEVICE
    assert_slot_holds(rig.model, slot, adapters["a"].expected)
    assert cache.state(B) is AdapterState.IN_HOST


def _flip_last_byte(record):
    data = bytearray(record.weights_path.read_bytes())
    data[-1] ^= 0xFF
    record.weights_path.write_bytes(bytes(data))


def _garbage_with_matching_metadata(record):
    garbage = b"\x07" * record.weights_path.stat().st_size
    record.weights_path.write_bytes(garbage)
    meta = json.loads((record.path / "metadata.json").read_text())
    meta["sha256"] = hashlib.sha256(garbage).hexdigest()
    (record.path / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, problem", [
    (_flip_last_byte, "sha256"),
    (lambda record: record.weights_path.unlink(), "missing"),
    (_garbage_with_matching_metadata, "not a valid safetensors file"),
])
def test_corrupt_file_fails_only_that_adapter(make_rig, adapters, damage, problem):
    rig = make_rig(customers=("a", "b"))
    cache = rig.cache
    damage(rig.store.get_version("a", 1))
    assert cache.prepare(A) == "loading" and cache.prepare(B) == "loading"
    assert wait_ready(cache, A) == "failed" and wait_ready(cache, B) == "ready"
    message = cache.error(A)
    assert "customer 'a' version 1 failed to load" in message and problem in message
    assert cache.state(A) is AdapterState.FAILED and cache.error(B) == ""
    assert cache.prepare(A) == "failed"  # known: no new load until the failure expires
    assert_slot_holds(rig.model, cache.pin(B), adapters["b"].expected)
    assert cache.stats().load_failures == 1


def test_failure_is_retried_after_its_time(make_rig, adapters):
    rig = make_rig(customers=("a",), retry_failed_after_s=0.2)
    cache = rig.cache
    record = rig.store.get_version("a", 1)
    _flip_last_byte(record)
    assert wait_ready(cache, A) == "failed"
    record.weights_path.write_bytes(adapters["a"].weights)  # the operator repairs it
    assert cache.prepare(A) == "failed"
    time.sleep(0.25)
    assert wait_ready(cache, A) == "ready" and rig.reads == [A, A]


def test_pin_rereads_an_adapter_the_host_tier_evicted(make_rig, adapters, small_nbytes):
    rig = make_rig(customers=("a", "b"), host_bytes=int(1.5 * small_nbytes))
    cache = rig.cache
    assert wait_ready(cache, A) == "ready" and wait_ready(cache, B) == "ready"  # B evicts A
    assert cache.state(A) is AdapterState.ON_DISK
    slot = cache.pin(A)  # the rare path: read on the engine thread rather than fail
    assert_slot_holds(rig.model, slot, adapters["a"].expected)
    assert rig.reads == [A, B, A]



def test_failed_reread_in_pin_raises_and_frees_the_slot(make_rig, small_nbytes):
    rig = make_rig(customers=("a", "b"), num_slots=1, host_bytes=int(1.5 * small_nbytes))
    cache = rig.cache
    assert wait_ready(cache, A) == "ready" and wait_ready(cache, B) == "ready"  # B evicts A
    _flip_last_byte(rig.store.get_version("a", 1))
    with pytest.raises(AdapterLoadError, match="sha256"):
        cache.pin(A)
    assert cache.state(A) is AdapterState.FAILED and cache.resident_keys() == []
    assert cache.can_pin(B) and cache.pin(B) == 0


def test_adapter_larger_than_the_host_budget_still_loads(make_rig, adapters, small_nbytes):
    rig = make_rig(customers=("big", "a"), host_bytes=small_nbytes)
    cache = rig.cache
    assert wait_ready(cache, BIG) == "ready" and cache.state(BIG) is AdapterState.IN_HOST
    assert wait_ready(cache, A) == "ready"  # the LRU holds A; BIG waits outside it for its pin
    assert cache.stats().host.resident == 1
    slot = cache.pin(BIG)
    assert_slot_holds(rig.model, slot, adapters["big"].expected)
    cache.unpin(BIG)
    assert cache.state(BIG) is AdapterState.ON_DEVICE


def test_disk_loads_hash_a_file_once_and_catch_a_change_on_disk(make_rig, adapters, small_nbytes, monkeypatch):
    from server.lora import store as store_module

    monkeypatch.setattr(store_module, "_RACY_NS", 0)  # trust a checked stamp at once (no second's wait)
    hashed = []
    real_sha256 = store_module._sha256_of
    monkeypatch.setattr(store_module, "_sha256_of", lambda fd, size: hashed.append(size) or real_sha256(fd, size))
    rig = make_rig(customers=("a", "b"), host_bytes=int(1.5 * small_nbytes))  # the host tier holds one
    cache = rig.cache
    for key in (A, B, A, B):  # each load evicts the other from host RAM: four disk loads
        assert wait_ready(cache, key) == "ready"
    assert rig.reads == [A, B, A, B] and len(hashed) == 2  # each file hashed on its first load only

    record = rig.store.get_version("a", 1)
    damaged = bytearray(adapters["a"].weights)
    damaged[-1] ^= 0xFF  # modified on disk after start-up: same size, another mtime
    record.weights_path.write_bytes(bytes(damaged))
    os.utime(record.weights_path, ns=(1, 1))
    assert wait_ready(cache, A) == "failed" and "sha256" in cache.error(A)
    assert len(hashed) == 3 and cache.state(A) is AdapterState.FAILED


def test_host_budget_defaults_to_a_quarter_of_available_memory_and_the_variable_overrides_it(monkeypatch):
    from server import config

    monkeypatch.setattr(config, "available_memory_bytes", lambda: 64 << 30)
    assert config.Settings().host_cache_bytes == 16 << 30
    assert config.Settings.from_env({}).host_cache_bytes == 16 << 30
    assert config.Settings.from_env({"LORAPLEX_HOST_CACHE_BYTES": "123456789"}).host_cache_bytes == 123456789
    assert config.Settings.from_env({}, host_cache_bytes=5).host_cache_bytes == 5  # the CLI flag
    monkeypatch.setattr(config, "available_memory_bytes", lambda: None)  # unknown: the old fixed default
    assert config.Settings().host_cache_bytes == 2 << 30


def test_available_memory_is_what_the_kernel_reports_capped_by_the_cgroup():
    from server.config import available_memory_bytes

    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    mem_available = int(meminfo["MemAvailable"].split()[0]) * 1024
    available = available_memory_bytes()
    assert 0 < available <= mem_available * 1.1  # read separately: it may move a little between reads


def test_page_locked_adapters_count_as_the_allocator_holds_them():
    """PyTorch's page-locked allocator rounds each block up to a power of two: the host tier counts that."""
    from server.lora.cache import host_bytes_held

    adapter = type("Sized", (), {"nbytes": 80_000_000})()
    assert host_bytes_held(adapter, page_locked=True) == 128 << 20
    assert host_bytes_held(adapter, page_locked=False) == 80_000_000
