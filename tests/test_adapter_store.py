"""The on-SSD adapter store, with real adapters saved by peft on a tiny random Llama.

Checked against independent facts: the bytes uploaded, hashlib's sha256, peft's own config,
what is (and is not) on disk, and a fresh store object over the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402

from server.lora.peft import AdapterValidationError, load_peft_adapter, load_peft_adapter_dir  # noqa: E402
from server.lora.store import (  # noqa: E402
    AdapterNotFound,
    AdapterStore,
    AdapterStoreCorrupt,
    InvalidCustomerId,
)
from server.model.config import ModelConfig  # noqa: E402
from tests.peft_helpers import save_random_tiny_adapter  # noqa: E402

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128)
MODEL = ModelConfig.from_hf_dict(LLAMA.to_dict())
LORAS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "ko_rslora": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_rslora=True),
}


def validate(config: bytes, weights: bytes):
    return load_peft_adapter(config, weights, MODEL, max_rank=64)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """Name -> (adapter_config.json bytes, adapter_model.safetensors bytes), as peft saved them."""
    out = {}
    for name, kwargs in LORAS.items():
        directory = save_random_tiny_adapter(LLAMA, kwargs, 0, tmp_path_factory.mktemp(name))
        out[name] = ((directory / "adapter_config.json").read_bytes(),
                     (directory / "adapter_model.safetensors").read_bytes())
    return out


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_put_get_list_delete_round_trip(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    config, weights = adapters["qv"]
    record = store.put("acme", config, weights, validate)

    assert (record.customer_id, record.version, record.rank, record.alpha) == ("acme", 1, 8, 16.0)
    assert record.target_modules == ["q_proj", "v_proj"] and record.use_rslora is False
    assert record.sha256 == hashlib.sha256(weights).hexdigest()
    assert record.bytes == len(config) + len(weights)
    created = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60

    assert record.path == tmp_path / "store" / "acme" / "v1"
    assert record.config_path.read_bytes() == config and record.weights_path.read_bytes() == weights
    assert store.read_files(record) == (config, weights)
    meta = record.to_dict()
    assert "path" not in meta and json.loads(json.dumps(meta)) == meta
    assert json.loads((record.path / "metadata.json").read_text()) == meta
    # The stored directory is a peft adapter that validates to the same tensors as the upload.
    stored = load_peft_adapter_dir(record.path, MODEL, max_rank=64)
    uploaded = validate(config, weights)
    assert stored.modules.keys() == uploaded.modules.keys()
    assert all(torch.equal(stored.modules[k].lora_b, uploaded.modules[k].lora_b) for k in stored.modules)

    assert store.get("acme") == record
    assert store.get_version("acme", 1) == record
    assert store.list() == [record]

    assert store.delete("acme") == record
    with pytest.raises(AdapterNotFound):
        store.get("acme")
    with pytest.raises(AdapterNotFound):
        store.delete("acme")
    assert store.list() == []
    with pytest.raises(AdapterNotFound):
        store.get("nobody")


def test_list_is_sorted_current_versions(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    for customer in ("zeta", "alpha", "mid"):
        store.put(customer, *adapters["qv"], validate)
    store.put("mid", *adapters["ko_rslora"], validate)
    store.put("gone", *adapters["qv"], validate)
    store.delete("gone")
    listed = store.list()
    assert [(r.customer_id, r.version) for r in listed] == [("alpha", 1), ("mid", 2), ("zeta", 1)]
    assert listed[1].rank == 4 and listed[1].use_rslora is True


def test_versions_rise_and_are_never_reused(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    first = store.put("acme", *adapters["qv"], validate)
    second = store.put("acme", *adapters["ko_rslora"], validate)
    assert (first.version, second.version) == (1, 2)
    assert store.get("acme") == second
    assert store.get_version("acme", 1) == first  # kept for requests still loading it
    assert store.read_files(first) == adapters["qv"]

    store.delete("acme")
    assert store.get_version("acme", 2) == second  # hidden, not yet pruned
    assert store.put("acme", *adapters["qv"], validate).version == 3
    assert store.put("other", *adapters["qv"], validate).version == 1  # per customer

    # Also after prune and restart, when no old directory is left to count from.
    assert store.prune("acme", keep=set()) == [1, 2]
    store.delete("acme")
    restarted = AdapterStore(tmp_path)
    assert not any(p.name.startswith("v") for p in (tmp_path / "acme").iterdir())
    assert restarted.put("acme", *adapters["qv"], validate).version == 4


def test_validation_failure_leaves_nothing_and_keeps_current(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    config, weights = adapters["qv"]
    with pytest.raises(AdapterValidationError) as info:
        store.put("acme", config, b"not safetensors", validate)
    assert info.value.field == "adapter_model"
    assert tree(tmp_path) == []

    record = store.put("acme", config, weights, validate)
    before = tree(tmp_path)
    sentinel = RuntimeError("refused")

    def refuse(config_bytes, weights_bytes):
        raise sentinel

    with pytest.raises(RuntimeError) as info:
        store.put("acme", *adapters["ko_rslora"], refuse)
    assert info.value is sentinel  # unchanged
    with pytest.raises(AdapterValidationError):
        store.put("acme", config.replace(b'"r": 8', b'"r": 0'), weights, validate)
    assert tree(tmp_path) == before
    assert store.get("acme") == record


@pytest.mark.parametrize("customer_id", [
    "../x", "a/b", ".", "..", "", "a" * 65, "caf\u00e9", "a\x00b", "/abs", "-lead", ".hidden", "a b", "a\n",
    "a\\b", "\uff41", None, b"bytes",
])
def test_invalid_customer_ids_are_refused_before_the_filesystem(tmp_path, adapters, customer_id):
    root = tmp_path / "store"
    store = AdapterStore(root)
    calls = []

    def spy(config_bytes, weights_bytes):
        calls.append(1)
        return validate(config_bytes, weights_bytes)

    with pytest.raises(InvalidCustomerId):
        store.put(customer_id, *adapters["qv"], spy)
    for call in (store.get, store.delete, lambda c: store.get_version(c, 1), lambda c: store.prune(c, set())):
        with pytest.raises(InvalidCustomerId):
            call(customer_id)
    assert calls == [] and tree(tmp_path) == ["store"]


def test_valid_customer_ids(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    for customer_id in ("a", "A" * 64, "team-1.prod_v2", "0"):
        assert store.put(customer_id, *adapters["qv"], validate).customer_id == customer_id
    assert len(store.list()) == 4


def test_restart_sees_the_same_records_and_removes_leftovers(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    old = store.put("acme", *adapters["qv"], validate)
    current = store.put("acme", *adapters["ko_rslora"], validate)
    other = store.put("beta", *adapters["qv"], validate)
    leftover_dir = tmp_path / "acme" / ".tmp-deadbeef"
    leftover_dir.mkdir()
    (leftover_dir / "adapter_model.safetensors").write_bytes(b"half written")
    (tmp_path / "beta" / ".tmp-cafe").write_bytes(b"2")  # a pointer update cut short

    restarted = AdapterStore(tmp_path)
    assert restarted.get("acme") == current and restarted.get("beta") == other
    assert restarted.list() == [current, other]
    assert not leftover_dir.exists() and not (tmp_path / "beta" / ".tmp-cafe").exists()
    assert not old.path.exists()  # no reader exists before start, so replaced versions go
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == ["current", "last_version", "v2"]


def test_crash_before_pointer_update_keeps_old_version(tmp_path, adapters, monkeypatch):
    store = AdapterStore(tmp_path)
    old = store.put("acme", *adapters["qv"], validate)
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if Path(dst).name == "current":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        store.put("acme", *adapters["ko_rslora"], validate)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "acme" / "v2").exists()  # written, never made current, removed by the failed put
    assert store.get("acme") == old
    assert not [p for p in (tmp_path / "acme").iterdir() if p.name.startswith(".tmp-")]

    restarted = AdapterStore(tmp_path)
    assert restarted.get("acme") == old
    assert restarted.put("acme", *adapters["ko_rslora"], validate).version == 3  # 2 was handed out: never reused


def test_concurrent_puts_get_distinct_versions(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    adapter = validate(*adapters["qv"])
    start = threading.Barrier(8)
    records, errors = [], []

    def upload(customer):
        start.wait()
        try:
            records.append(store.put(customer, *adapters["qv"], lambda c, w: adapter))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=("acme" if i < 6 else "beta",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in records if r.customer_id == "acme") == [1, 2, 3, 4, 5, 6]
    assert sorted(r.version for r in records if r.customer_id == "beta") == [1, 2]
    assert store.get("acme").version == 6 and store.get("beta").version == 2
    for r in records:
        assert store.get_version(r.customer_id, r.version) == r
        assert store.read_files(r) == adapters["qv"]


@pytest.mark.parametrize("damage, file_named", [
    (lambda d: (d / "v1" / "metadata.json").write_text("{not json"), "metadata.json"),
    (lambda d: (d / "v1" / "metadata.json").write_text('{"customer_id": "acme"}'), "metadata.json"),
    (lambda d: (d / "v1" / "metadata.json").unlink(), "metadata.json"),
    (lambda d: (d / "v1" / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    (lambda d: (d / "v1" / "adapter_config.json").write_bytes(b"{}"), "v1"),  # size differs
    (lambda d: (d / "current").write_text("garbage"), "current"),
])
def test_damaged_adapter_raises_a_clear_error(tmp_path, adapters, damage, file_named):
    store = AdapterStore(tmp_path)
    store.put("acme", *adapters["qv"], validate)
    damage(tmp_path / "acme")
    with pytest.raises(AdapterStoreCorrupt, match="acme") as info:
        store.get("acme")
    assert info.value.customer_id == "acme" and info.value.path.name == file_named
    assert file_named in str(info.value)
    with pytest.raises(AdapterStoreCorrupt):
        store.list()
    AdapterStore(tmp_path)  # a restart does not fail on it
    with pytest.raises(AdapterStoreCorrupt, match="deleted"):
        store.delete("acme")  # an operator can still remove it
    with pytest.raises(AdapterNotFound):
        store.get("acme")


def test_read_files_detects_changed_bytes(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    record = store.put("acme", *adapters["qv"], validate)
    weights = bytearray(record.weights_path.read_bytes())
    weights[-1] ^= 0xFF  # same size, different content
    record.weights_path.write_bytes(bytes(weights))
    assert store.get("acme") == record  # get checks sizes only; read_files hashes
    with pytest.raises(AdapterStoreCorrupt, match="sha256"):
        store.read_files(record)


def test_prune_removes_only_unused_non_current_versions(tmp_path, adapters):
    store = AdapterStore(tmp_path)
    for _ in range(4):
        store.put("acme", *adapters["qv"], validate)
    store.put("beta", *adapters["qv"], validate)
    store.put("beta", *adapters["qv"], validate)

    assert store.prune("acme", keep={2}) == [1, 3]
    assert [p.name for p in sorted((tmp_path / "acme").glob("v*"))] == ["v2", "v4"]
    assert store.get("acme").version == 4 and store.get_version("acme", 2).version == 2
    with pytest.raises(AdapterNotFound):
        store.get_version("acme", 1)
    assert store.prune("acme", keep=set()) == [2]
    assert store.prune("acme", keep=set()) == []  # the current version is never pruned
    assert store.get("acme").version == 4
    assert len(list((tmp_path / "beta").glob("v*"))) == 2  # other customers untouched

    store.delete("acme")
    assert store.prune("acme", keep=set()) == [4]
    assert not list((tmp_path / "acme").glob("v*")) and store.prune("nobody", keep=set()) == []


@pytest.fixture
def count_hashes(monkeypatch):
    """Counts the weights files the store hashes (its sha256 over a file)."""
    from server.lora import store as store_module

    hashed = []
    real = store_module._sha256_of

    def counting(fd, size):
        hashed.append(size)
        return real(fd, size)

    monkeypatch.setattr(store_module, "_sha256_of", counting)
    return hashed


def _open(store, record) -> bytes:
    with store.open_verified(record) as files:
        return files.config + os.pread(files.weights_fd, files.weights_size, 0)


def _rewrite(path: Path, data: bytes, mtime_ns: int) -> None:
    """Write the file in place and give it an mtime of our choosing (a real rewrite moves it too,
    but within one tick of a coarse filesystem clock it might not: the test would be flaky)."""
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_weights_are_hashed_once_then_trusted_until_they_change(tmp_path, adapters, count_hashes, monkeypatch):
    from server.lora import store as store_module

    monkeypatch.setattr(store_module, "_RACY_NS", 0)  # trust a stamp at once: the test need not wait a second
    store = AdapterStore(tmp_path)
    config, weights = adapters["qv"]
    record = store.put("acme", config, weights, validate)
    for _ in range(3):
        assert _open(store, record) == config + weights
    assert len(count_hashes) == 1  # the first load after the upload; the later ones trust the stamp

    changed = bytearray(weights)
    changed[-1] ^= 0xFF  # same size, different bytes, another mtime: modified on disk after start-up
    mtime = record.weights_path.stat().st_mtime_ns
    _rewrite(record.weights_path, bytes(changed), mtime - 10**9)
    for _ in range(2):  # detected, and never trusted while it does not match
        with pytest.raises(AdapterStoreCorrupt, match="sha256"):
            _open(store, record)
    assert len(count_hashes) == 3

    _rewrite(record.weights_path, weights, mtime - 2 * 10**9)  # repaired: verified again, then trusted
    assert _open(store, record) == config + weights and _open(store, record) == config + weights
    assert len(count_hashes) == 4

    restarted = AdapterStore(tmp_path)  # a new process: each file is hashed once again
    assert _open(restarted, record) == config + weights and _open(restarted, record) == config + weights
    assert len(count_hashes) == 5


def test_a_file_changed_within_the_racy_window_is_hashed_every_time(tmp_path, adapters, count_hashes, monkeypatch):
    from server.lora import store as store_module

    monkeypatch.setattr(store_module, "_RACY_NS", 3600 * 10**9)  # every file counts as just written
    store = AdapterStore(tmp_path)
    record = store.put("acme", *adapters["qv"], validate)
    for _ in range(3):
        _open(store, record)
    assert len(count_hashes) == 3


def test_open_verified_checks_sizes_every_time_and_a_change_while_reading(tmp_path, adapters, monkeypatch):
    from server.lora import store as store_module

    monkeypatch.setattr(store_module, "_RACY_NS", 0)
    store = AdapterStore(tmp_path)
    config, weights = adapters["qv"]
    record = store.put("acme", config, weights, validate)
    _open(store, record)  # verified and trusted
    record.config_path.write_bytes(config + b" ")  # the size check needs no hash
    with pytest.raises(AdapterStoreCorrupt, match="differs from metadata"):
        _open(store, record)
    record.config_path.write_bytes(config)
    with pytest.raises(AdapterStoreCorrupt, match="changed while being read"):
        with store.open_verified(record):
            _rewrite(record.weights_path, weights, record.weights_path.stat().st_mtime_ns - 10**9)
    record.weights_path.unlink()
    with pytest.raises(AdapterStoreCorrupt, match="missing"):
        _open(store, record)
