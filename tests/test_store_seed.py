"""The 2,000-adapter benchmark's store seeding (loadtest/store_seed.py): customers that share an
adapter's content are still distinct, complete, verifiable entries of the store, and their
weights are stored once."""

import os

import pytest

from loadtest.checkpoint import QKVO, TINY, peft_adapter_files
from loadtest.store_seed import seed_store
from server.lora.peft import load_peft_adapter
from server.lora.store import AdapterStore
from server.model.config import ModelConfig


@pytest.fixture
def cfg():
    return ModelConfig.from_hf_dict({**TINY, "model_type": "llama"})


def test_seeded_customers_are_distinct_verified_entries_sharing_weights(tmp_path, cfg):
    customers = ["c-0", "c-1", "c-2", "c-3"]
    content = [0, 1, 0, 0]
    made = []

    def make_files(c):
        made.append(c)
        return peft_adapter_files(cfg, 4 * (c + 1), QKVO, 10 + c, "cpu", "tiny")

    summary = seed_store(tmp_path, customers, content, make_files,
                         lambda c, w: load_peft_adapter(c, w, cfg, max_rank=16))
    assert sorted(made) == [0, 1]  # each content built (and validated) once
    assert summary["customers"] == 4 and summary["distinct_adapters"] == 2

    store = AdapterStore(tmp_path)  # a fresh store, as the server opens it: recovery keeps them all
    records = {r.customer_id: r for r in store.list()}
    assert sorted(records) == customers
    assert [records[c].rank for c in customers] == [4, 8, 4, 4]
    assert all(records[c].version == 1 for c in customers)
    assert os.stat(records["c-0"].weights_path).st_ino == os.stat(records["c-3"].weights_path).st_ino
    assert os.stat(records["c-0"].weights_path).st_ino != os.stat(records["c-1"].weights_path).st_ino
    for customer in customers:  # each loads through the store's own checks (sizes, sha256)
        with store.open_verified(records[customer]) as files:
            assert files.weights_size == os.stat(records[customer].weights_path).st_size
        assert store.read_files(records[customer])[1] == records[customer].weights_path.read_bytes()
