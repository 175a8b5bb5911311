"""One adapter store directory used by several processes (replicas): version numbers never
collide, a retired version outlives the retention so that other replicas' requests can finish on
it, and a replica starting up leaves the others' work in progress alone."""

from __future__ import annotations

import multiprocessing
import os
import time
from types import SimpleNamespace

import pytest

from server.config import Settings
from server.lora.shared_store import RETENTION_MARGIN_S, retention_seconds
from server.lora.store import AdapterNotFound, AdapterStore

CONFIG = b'{"peft_type": "LORA", "r": 4}'


def fake_validate(config: bytes, weights: bytes):
    """The store only needs these fields; adapter validation is tested elsewhere."""
    return SimpleNamespace(rank=4, alpha=8, target_modules=["q_proj"], use_rslora=False, use_dora=False)


def _upload_many(root: str, tag: str, count: int, start, results) -> None:
    store = AdapterStore(root, shared_retention_s=60.0)
    start.wait()
    for i in range(count):
        record = store.put("acme", CONFIG, f"{tag}-{i}".encode() * 1000, fake_validate)
        results.put((tag, record.version))


def test_uploads_from_two_processes_get_distinct_versions(tmp_path):
    root, per_process = str(tmp_path / "store"), 15
    AdapterStore(root, shared_retention_s=60.0)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_upload_many, args=(root, tag, per_process, start, results)) for tag in "ab"]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0, "an upload failed (a version number collided?)"
    versions = sorted(results.get(timeout=5)[1] for _ in range(2 * per_process))

    assert versions == list(range(1, 2 * per_process + 1))
    store = AdapterStore(root, shared_retention_s=60.0)
    current = store.get("acme")
    assert current.version == 2 * per_process  # `current` names the newest, whoever wrote it last
    assert store.read_files(current)[1].startswith((b"a-14", b"b-14"))


def test_a_retired_version_stays_until_the_retention_has_passed(tmp_path):
    replica_a = AdapterStore(tmp_path, shared_retention_s=0.5)
    replica_b = AdapterStore(tmp_path, shared_retention_s=0.5)
    replica_a.put("acme", CONFIG, b"one" * 100, fake_validate)
    in_use_on_b = replica_b.get("acme")  # a request on replica B resolved version 1
    replica_b.put("acme", CONFIG, b"two" * 100, fake_validate)

    assert replica_a.prune("acme", keep=set()) == []  # first seen retired now: kept
    assert replica_b.read_files(replica_b.get_version("acme", 1))[1] == b"one" * 100
    assert replica_a.customers_with_old_versions() == ["acme"]
    time.sleep(0.6)
    assert replica_a.prune("acme", keep={1}) == []  # past the retention, but still used on A
    assert replica_a.prune("acme", keep=set()) == [1]
    with pytest.raises(AdapterNotFound):
        replica_b.get_version("acme", in_use_on_b.version)
    assert replica_b.get("acme").version == 2 and replica_a.customers_with_old_versions() == []


def test_a_deleted_adapter_is_gone_at_once_and_its_files_after_the_retention(tmp_path):
    replica_a = AdapterStore(tmp_path, shared_retention_s=0.3)
    replica_b = AdapterStore(tmp_path, shared_retention_s=0.3)
    replica_a.put("acme", CONFIG, b"one" * 100, fake_validate)
    replica_b.delete("acme")
    with pytest.raises(AdapterNotFound):
        replica_a.get("acme")
    assert replica_a.prune("acme", keep=set()) == [] and (tmp_path / "acme" / "v1").is_dir()
    time.sleep(0.35)
    assert replica_b.prune("acme", keep=set()) == [1] and not (tmp_path / "acme" / "v1").exists()


def test_an_owned_store_prunes_at_once(tmp_path):
    """The single-process store keeps its old behaviour: nothing else can be using a version."""
    store = AdapterStore(tmp_path)
    store.put("acme", CONFIG, b"one" * 100, fake_validate)
    store.put("acme", CONFIG, b"two" * 100, fake_validate)
    assert store.prune("acme", keep=set()) == [1]


def test_a_replica_starting_up_leaves_fresh_temp_dirs_and_retired_versions_alone(tmp_path):
    running = AdapterStore(tmp_path, shared_retention_s=30.0)
    running.put("acme", CONFIG, b"one" * 100, fake_validate)
    running.put("acme", CONFIG, b"two" * 100, fake_validate)
    fresh = tmp_path / "acme" / ".tmp-another-replica-writing"
    fresh.mkdir()
    stale = tmp_path / "acme" / ".tmp-left-by-a-crash"
    stale.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    AdapterStore(tmp_path, shared_retention_s=30.0)  # another replica starts

    assert fresh.is_dir() and not stale.exists()
    assert (tmp_path / "acme" / "v1").is_dir()  # retired just now: another replica may be using it
    AdapterStore(tmp_path)  # an owned store (one process) removes every leftover at start
    assert not fresh.exists() and not (tmp_path / "acme" / "v1").exists()


def test_the_retention_follows_the_request_deadline_and_is_checked():
    assert retention_seconds(600) == 600 + RETENTION_MARGIN_S
    assert retention_seconds(600, configured=900) == 900
    with pytest.raises(ValueError, match="LORAPLEX_MAX_REQUEST_SECONDS"):
        Settings.from_env({}, adapter_store_shared=True, max_request_seconds=0)
    with pytest.raises(ValueError, match="at least max_request_seconds"):
        Settings.from_env({"LORAPLEX_ADAPTER_STORE_SHARED": "1", "LORAPLEX_ADAPTER_STORE_RETENTION_SECONDS": "5"})
    assert Settings.from_env({}).adapter_store_retention() is None
