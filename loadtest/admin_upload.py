"""Upload many PEFT adapters through the admin API, a few at once, and summarise how it went."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from loadtest.serving_report import percentiles


def upload_adapters(base_url: str, admin_token: str, customer_ids: list[str],
                    make_files: Callable[[int], tuple[bytes, bytes]], concurrency: int, timeout_s: float,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """PUT /admin/adapters/{id} (multipart adapter_config + adapter_model) for every customer.
    `make_files(i)` builds the i-th adapter just before its upload, so at most `concurrency`
    adapters are in memory; `request_s` times the HTTP request alone (validation and storage).
    `progress(done, total)` is called after each upload."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    finished = [0]
    lock = threading.Lock()

    def upload(index: int) -> dict:
        try:
            return upload_one(index)
        finally:
            if progress is not None:
                with lock:
                    finished[0] += 1
                    progress(finished[0], len(customer_ids))

    def upload_one(index: int) -> dict:
        config, weights = make_files(index)
        files = {"adapter_config": ("adapter_config.json", config, "application/json"),
                 "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream")}
        start = time.perf_counter()
        try:
            response = httpx.put(f"{base_url}/admin/adapters/{customer_ids[index]}", files=files, headers=headers,
                                 timeout=timeout_s)
        except httpx.HTTPError as e:
            return {"error": type(e).__name__, "message": str(e)[:300], "bytes": len(weights)}
        out = {"seconds": time.perf_counter() - start, "bytes": len(weights)}
        if response.status_code != 201:
            out.update(error=f"http_{response.status_code}", message=response.text[:300])
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as executor:
        uploads = list(executor.map(upload, range(len(customer_ids))))
    wall = time.perf_counter() - start
    failed = [u for u in uploads if u.get("error")]
    errors: dict[str, int] = {}
    for u in failed:
        errors[u["error"]] = errors.get(u["error"], 0) + 1
    return {"count": len(uploads), "ok": len(uploads) - len(failed), "concurrency": concurrency, "wall_s": wall,
            "bytes_each": uploads[0]["bytes"] if uploads else 0,
            "request_s": percentiles([u["seconds"] for u in uploads if not u.get("error")]),
            "errors": errors, "error_examples": [u["message"] for u in failed[:3]]}
