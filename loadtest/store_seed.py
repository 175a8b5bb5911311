"""Seed an adapter store with thousands of customers before the server starts (the 2,000-adapter
benchmark), sharing weight files on disk.

2,000 Llama-2-7B adapters of ranks 8-64 on q,k,v,o are ~126 GB: more than the GPU machine's
disk, and hours through the admin API. Each distinct adapter is stored once through
`AdapterStore.put` (validated as an upload is); every further customer given the same content
gets its own version directory in the store's documented layout (server/lora/store.py: config,
metadata naming that customer, `current`, `last_version`) whose weights file is a hard link to
the first one's. To the server these are distinct adapters: its own record, its own cache entry
and GPU slot, its own first-load hash; only the bytes on disk are shared, so their reads come
from the page cache (as those of 126 GB just written would on a 128 GB machine). The upload path
itself is measured elsewhere (loadtest/bench_upload_under_load.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from server.lora.store import (CONFIG_FILE, CURRENT_FILE, LAST_VERSION_FILE, METADATA_FILE, WEIGHTS_FILE,
                               AdapterRecord, AdapterStore)


def seed_store(root: Path, customers: list[str], content_of: list[int],
               make_files: Callable[[int], tuple[bytes, bytes]], validate, progress=None) -> dict:
    """Customer i gets adapter content `content_of[i]` (built by `make_files(content)`); returns
    counts and the distinct contents' sizes."""
    store = AdapterStore(root)
    first: dict[int, AdapterRecord] = {}
    config_of: dict[int, bytes] = {}
    for i, (customer, content) in enumerate(zip(customers, content_of)):
        if content not in first:
            config, weights = make_files(content)
            first[content] = store.put(customer, config, weights, validate)
            config_of[content] = config
        else:
            link_copy(root, first[content], customer, config_of[content])
        if progress is not None and (i + 1) % 250 == 0:
            progress(f"  {i + 1}/{len(customers)} customers in the store")
    return {"customers": len(customers), "distinct_adapters": len(first),
            "distinct_bytes": sum(r.bytes for r in first.values())}


def link_copy(root: Path, source: AdapterRecord, customer: str, config: bytes) -> AdapterRecord:
    """`customer`'s version 1: `source`'s config and metadata under the new name, its weights a hard link."""
    customer_dir = root / customer
    version_dir = customer_dir / "v1"
    version_dir.mkdir(parents=True)
    record = replace(source, customer_id=customer, version=1, path=version_dir)
    (version_dir / CONFIG_FILE).write_bytes(config)
    os.link(source.weights_path, version_dir / WEIGHTS_FILE)
    (version_dir / METADATA_FILE).write_text(json.dumps(record.to_dict(), indent=1))
    (customer_dir / LAST_VERSION_FILE).write_text("1\n")
    (customer_dir / CURRENT_FILE).write_text("1\n")
    return record
