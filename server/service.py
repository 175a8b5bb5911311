"""The serving runtime the HTTP API talks to: engine, engine loop, adapter store and cache.

Built once from Settings (`Service.start`, in the app's lifespan) so the API layer holds no
tensors and no tokenizer: it asks this module for prompt token ids, adapter keys, uploads and
the engine's state, and streams generations through `EngineLoop`.

Tenants and versions. A customer's adapter is identified in the engine by `(customer_id,
version)`. `acquire_adapter` resolves the customer's current version when a request arrives and
counts it in flight until `release_adapter`; an upload or delete passes the versions still in
flight to the cache, which keeps their files, so a replace or delete never disturbs a running
request, and new requests see the change at once. When the last request on a retired version
finishes, its files are pruned.

Replicas sharing one store (`LORAPLEX_ADAPTER_STORE_SHARED`): each also runs a `StoreSweeper`
that retires, in its own cache, the versions another replica replaced or deleted, and lets the
store prune retired versions once no request on any replica can still use them
(server/lora/shared_store.py).
"""

from __future__ import annotations

import logging
import re
import shutil
import tarfile
import tempfile
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from server.admission import Admission, AdmissionLimits
from server.config import Settings
from server.engine.engine import Engine, resolve_device_dtype
from server.engine.loop import EngineLoop, StreamEvent
from server.engine.request import GenerationRequest
from server.lora.cache import AdapterCache, AdapterKey
from server.lora.compose import Recipe, SourceForbidden, compose
from server.lora.merge import merge_adapter_dir
from server.lora.peft import (CONFIG_FILE, WEIGHTS_FILE, AdapterValidationError, load_peft_adapter,
                               max_adapter_upload_bytes)
from server.lora.shared_store import StoreSweeper
from server.lora.store import AdapterNotFound, AdapterRecord, AdapterStore, check_customer_id
from server.metrics import EngineSnapshot, Metrics
from server.model.config import ModelConfig
from server.model.prepare import prepare_model
from server.model.quantized import describe_memory, device_memory

log = logging.getLogger(__name__)

STALLED_AFTER_S = 60.0  # /ready fails when the engine loop has not completed an iteration for this long
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip, raw pickle


class ServingEngine(Engine):
    """The engine, observed: queue time per sequence and batch shape and duration per step."""

    metrics: Metrics | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queued_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # seq -> monotonic time
        self._last_batch: tuple[int, int, int] | None = None

    def submit(self, seq) -> None:
        self._queued_at[seq] = time.monotonic()
        super().submit(seq)

    def run(self, chunks, all_logits=frozenset()):
        if self.metrics is not None:
            now = time.monotonic()
            for chunk in chunks:
                queued_at = self._queued_at.pop(chunk.seq, None)
                if queued_at is not None:  # first scheduled (a preempted one is not counted again)
                    self.metrics.observe_queue_time(now - queued_at)
            adapters = {c.seq.adapter_key for c in chunks if c.seq.adapter_key is not None}
            self._last_batch = (len(chunks), len(adapters), sum(c.num_tokens for c in chunks))
        return super().run(chunks, all_logits)

    def step(self):
        start = time.perf_counter()
        updated = super().step()
        if self._last_batch is not None and self.metrics is not None:
            self.metrics.observe_step(*self._last_batch, time.perf_counter() - start)
            self._last_batch = None
        return updated


@dataclass(frozen=True)
class ServedModel:
    name: str  # the base model's id in the API
    path: Path
    device: str
    dtype: str


class Service:
    def __init__(self, settings: Settings, engine: Engine, store: AdapterStore, cache: AdapterCache,
                 model: ServedModel):
        self.settings, self.engine, self.store, self.cache, self.model = settings, engine, store, cache, model
        self.model_config: ModelConfig = engine.model.config
        self.loop = EngineLoop(engine)
        largest = max_adapter_upload_bytes(self.model_config, settings.max_lora_rank)
        self.upload_limit = min(settings.max_upload_bytes, largest)  # bytes of one upload, both files
        self.upload_limit_source = ("LORAPLEX_MAX_UPLOAD_BYTES" if settings.max_upload_bytes <= largest else
                                    f"the largest valid adapter for this base model at rank {settings.max_lora_rank}")
        self.admission = Admission(AdmissionLimits(
            settings.max_queued_requests, settings.max_queued_requests_per_tenant, settings.max_requests_per_tenant,
            settings.max_queued_tokens, settings.max_queued_tokens_per_tenant))
        self._in_flight: Counter[AdapterKey] = Counter()
        self._memory: dict | None = None
        self._lock = threading.Lock()  # orders version resolution against retirement of versions
        self.sweeper: StoreSweeper | None = None
        if store.shared_retention_s is not None:
            self.sweeper = StoreSweeper(self._customers_to_sweep, self.retire_old_versions,
                                        settings.adapter_store_poll_seconds)

    @classmethod
    def start(cls, settings: Settings, metrics: Metrics | None = None) -> "Service":
        """Prepare and load the model, open the adapter store, start the engine thread."""
        model_dir = prepare_model(settings, settings.model, progress=False)
        store = AdapterStore(settings.adapter_store_dir, shared_retention_s=settings.adapter_store_retention())
        model_config = ModelConfig.from_dir(model_dir)
        caches: list[AdapterCache] = []

        def make_cache(pool):
            cache = AdapterCache(store, pool, model_config, host_bytes=settings.host_cache_bytes,
                                 max_rank=settings.max_lora_rank, dtype=pool.dtype)
            caches.append(cache)
            return cache

        engine = ServingEngine.from_dir(model_dir, settings, make_cache)
        engine.metrics = metrics
        device, dtype = resolve_device_dtype(settings.device, settings.dtype)
        model = ServedModel(settings.served_model_name or Path(model_dir).name, Path(model_dir), str(device),
                            str(dtype).removeprefix("torch."))
        service = cls(settings, engine, store, caches[0], model)
        service.loop.start()
        if service.sweeper is not None:
            service.sweeper.start()
        limits = engine.limits
        log.info("serving %s on %s (%s); %s", model.name, model.device, model.dtype,
                 describe_memory(service.memory, limits.num_kv_blocks * limits.kv_block_size, limits.lora_pages))
        return service

    @property
    def memory(self) -> dict | None:
        """Bytes the device holds: weights (and their format), KV cache, adapter pool."""
        if self._memory is None:
            engine = self.engine
            if not all(hasattr(engine, name) for name in ("model", "kv_cache", "pool")):
                return None  # a stand-in engine (tests, loadtest/bench_http_side.py)
            self._memory = device_memory(engine.model, engine.kv_cache, engine.pool)
        return self._memory

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.loop.stop()
        self.cache.close()
        if self.loop.thread_ended and hasattr(self.engine, "close"):
            self.engine.close()  # tensor-parallel workers (none otherwise); never while a step may still run

    def stop_engine(self) -> None:
        """Stop the engine loop (blocking): every open stream ends with an error event saying the
        server is shutting down. Nothing runs afterwards; `stop()` is still due."""
        self.loop.stop()

    # --- health
    def is_ready(self) -> bool:
        return self.loop.is_alive and time.monotonic() - self.loop.last_step_at < STALLED_AFTER_S

    # --- models and tenants
    def is_base_model_name(self, name: str) -> bool:
        """The base model's id, also as a path or hub name ending in it (org/SmolLM2-135M-Instruct)."""
        names = {self.model.name.lower(), self.model.path.name.lower()}
        if self.settings.model:
            names.add(str(self.settings.model).lower())
        name = name.strip().lower()
        return name in names or name.rstrip("/").rsplit("/", 1)[-1] in names

    def acquire_adapter(self, customer_id: str) -> AdapterKey:
        """The customer's current adapter version, counted in flight until `release_adapter`.

        Raises InvalidCustomerId or AdapterNotFound."""
        check_customer_id(customer_id)
        with self._lock:
            record = self.store.get(customer_id)
            key = (record.customer_id, record.version)
            self._in_flight[key] += 1
        return key

    def release_adapter(self, key: AdapterKey) -> None:
        customer_id, version = key
        with self._lock:
            self._in_flight[key] -= 1
            if self._in_flight[key] > 0:
                return
            del self._in_flight[key]
        # The last request on this version finished: if it was replaced or deleted, its files can go.
        self.retire_old_versions(customer_id, unless_current=version)

    def retire_old_versions(self, customer_id: str, unless_current: int | None = None) -> None:
        """Drop the customer's non-current versions from the cache and prune their files, but
        those that requests in flight here still carry (and, in a shared store, those retired too
        recently for the other replicas' requests to have ended)."""
        with self._lock:
            try:
                current = self.store.get(customer_id).version
            except AdapterNotFound:
                current = None
            except Exception:  # a damaged store: leave the files for the next start
                return
            if unless_current is not None and current == unless_current:
                return
            in_use = self._versions_in_flight(customer_id)
        if current is None:
            self.cache.forget(customer_id, in_use)
        else:
            self.cache.release_old_versions(customer_id, current, in_use)

    def _customers_to_sweep(self) -> set[str]:
        """Customers with retired versions on disk, or cached here while no longer current."""
        customers = set(self.store.customers_with_old_versions())
        held: dict[str, set[int]] = {}
        for customer_id, version in self.cache.held_keys():
            held.setdefault(customer_id, set()).add(version)
        for customer_id, versions in held.items():
            if customer_id not in customers and versions - {self.store.current_version(customer_id)}:
                customers.add(customer_id)
        return customers

    def _versions_in_flight(self, customer_id: str) -> set[int]:
        return {version for (c, version) in self._in_flight if c == customer_id}

    # --- prompts (tokenizer work: call off the event loop)
    def completion_prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return list(prompt)

    def check_json_schema(self, schema: str) -> None:
        """Compile a response format's JSON schema (cached for its requests); ValueError if it cannot be."""
        self.engine.grammars.compile(schema)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (log-probabilities name tokens so)."""
        decode = self.engine.tokenizer.decode
        return [decode([i]) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The model's chat template over the whole conversation, ready for the assistant's turn."""
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2 TemplateError: e.g. the template insists on alternating roles
            raise ValueError(f"the model's chat template rejected the messages: {e}") from None
        return tokenizer.encode(text, add_special_tokens=False)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, *, where: str = "prompt") -> None:
        """Prompt plus completion must fit the context and (alone) the KV cache."""
        limits = self.engine.limits
        context = min(limits.max_model_len, limits.num_kv_blocks * limits.kv_block_size)
        if num_prompt_tokens == 0:
            raise ValueError(f"the {where} is empty")
        if num_prompt_tokens + max_tokens > context:
            raise ValueError(
                f"this model's maximum context length is {context} tokens, but {num_prompt_tokens + max_tokens} "
                f"were requested ({num_prompt_tokens} in the {where}, {max_tokens} in the completion); "
                f"shorten the {where} or lower max_tokens")

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        limits = self.engine.limits
        context = min(limits.max_model_len, limits.num_kv_blocks * limits.kv_block_size)
        return max(1, context - num_prompt_tokens)

    # --- generation
    def stream(self, request: GenerationRequest, adapter_key: AdapterKey | None) -> AsyncIterator[StreamEvent]:
        return self.loop.stream(request, adapter_key)

    # --- adapters (admin API; blocking: call off the event loop)
    def validate_adapter(self, config_bytes: bytes, weights_bytes: bytes):
        if weights_bytes.startswith(_PICKLE_MAGIC):
            raise AdapterValidationError(
                "adapter_model is a pickled PyTorch file (adapter_model.bin), which is never loaded: upload "
                "adapter_model.safetensors (peft's save_pretrained(..., safe_serialization=True))", "adapter_model")
        return load_peft_adapter(config_bytes, weights_bytes, self.model_config,
                                 max_rank=self.settings.max_lora_rank, max_bytes=self.upload_limit,
                                 allowed_modules=self.settings.restricted_lora_modules())

    def put_adapter(self, customer_id: str, config_bytes: bytes, weights_bytes: bytes,
                    recipe: dict | None = None) -> AdapterRecord:
        """Validate and store a new version, make it current, retire older unused versions."""
        record = self.store.put(customer_id, config_bytes, weights_bytes, self.validate_adapter, recipe)
        with self._lock:
            in_use = self._versions_in_flight(customer_id)
        self.cache.release_old_versions(customer_id, record.version, in_use)
        return record

    def compose_adapter(self, customer_id: str, recipe: Recipe) -> AdapterRecord:
        """Compose the recipe's sources (their current versions) into the customer's new version,
        stored as an upload is, with the recipe (and each source's version and sha256) as its
        provenance. Raises RecipeError, SourceForbidden, AdapterNotFound (a source); nothing is
        stored unless the composition is valid."""
        check_customer_id(customer_id)
        recipe.check(self.settings.max_lora_rank)
        shared = self.settings.shared_adapter_ids
        records = []
        for i, source in enumerate(recipe.sources):
            check_customer_id(source.customer_id)
            if shared is not None and source.customer_id != customer_id and source.customer_id not in shared:
                raise SourceForbidden(f"sources[{i}]: customer {customer_id!r} may not read the adapter of "
                                      f"{source.customer_id!r}: a composition reads the customer's own adapter and "
                                      "the shared ones (LORAPLEX_SHARED_ADAPTERS)", f"sources[{i}].customer_id")
            try:
                records.append(self.store.get(source.customer_id))
            except AdapterNotFound:
                raise AdapterNotFound(f"sources[{i}]: no adapter for customer {source.customer_id!r}") from None
        adapters = [load_peft_adapter(*self.store.read_files(r), self.model_config, max_rank=self.settings.max_lora_rank)
                    for r in records]
        config_bytes, weights_bytes = compose(recipe, adapters, max_rank=self.settings.max_lora_rank)
        provenance = {"method": recipe.method, "rank": recipe.rank, "sources": [
            {"customer_id": r.customer_id, "version": r.version, "sha256": r.sha256, "weight": s.weight}
            for r, s in zip(records, recipe.sources)]}
        return self.put_adapter(customer_id, config_bytes, weights_bytes, recipe=provenance)

    def export_merged(self, customer_id: str) -> tuple[Path, Path, str]:
        """The customer's current adapter merged into the served base checkpoint, as one tar file
        (server/lora/merge.py): (work directory to remove once sent, the tar, its top directory's
        name). Built under <home>/exports: it takes about twice the checkpoint's size on disk."""
        record = self.store.get(check_customer_id(customer_id))
        config_bytes, weights_bytes = self.store.read_files(record)  # sha256-checked
        exports = self.settings.home / "exports"
        exports.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{customer_id}-", dir=exports))
        try:
            adapter_dir = work / "adapter"
            adapter_dir.mkdir()
            (adapter_dir / CONFIG_FILE).write_bytes(config_bytes)
            (adapter_dir / WEIGHTS_FILE).write_bytes(weights_bytes)
            base_name = re.sub(r"[^A-Za-z0-9._-]", "_", self.model.name)  # a served name may be "org/model"
            name = f"{base_name}-{customer_id}-v{record.version}-merged"
            merged = merge_adapter_dir(adapter_dir, self.model.path, work / name)
            tar_path = work / f"{name}.tar"
            with tarfile.open(tar_path, "w") as tar:
                tar.add(merged, arcname=name)
            shutil.rmtree(merged)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return work, tar_path, name

    def delete_adapter(self, customer_id: str) -> AdapterRecord:
        record = self.store.delete(customer_id)
        with self._lock:
            in_use = self._versions_in_flight(customer_id)
        self.cache.forget(customer_id, in_use)
        return record

    def get_adapter(self, customer_id: str) -> AdapterRecord:
        return self.store.get(customer_id)

    def list_adapters(self) -> list[AdapterRecord]:
        return self.store.list()

    def adapter_state(self, record: AdapterRecord) -> str:
        return self.cache.state((record.customer_id, record.version)).value

    # --- metrics
    def snapshot(self) -> EngineSnapshot:
        """The engine's state, read from another thread; the engine mutates it meanwhile, so a
        read that races a change is retried (the values are gauges: one step old is fine)."""
        for attempt in range(5):
            try:
                return self._read_snapshot()
            except RuntimeError:  # "dictionary/deque mutated during iteration"
                time.sleep(0.001 * (attempt + 1))
        return self._read_snapshot()

    def _read_snapshot(self) -> EngineSnapshot:
        engine = self.engine
        limit = engine.limits.lora_pages  # the most adapters resident at once
        scheduler = engine.scheduler
        running = list(dict.fromkeys(customer for customer, _ in self.cache.resident_keys()))
        waiting = []
        for queue in list(scheduler.waiting.values()):
            for seq in list(queue):
                key = seq.adapter_key
                if key is not None and key[0] not in running and key[0] not in waiting and len(waiting) < limit:
                    waiting.append(key[0])
        return EngineSnapshot(
            num_running=len(scheduler.running), num_waiting=scheduler.num_waiting,
            kv_cache_usage=engine.blocks.usage_ratio, num_preemptions=engine.num_preemptions,
            num_steps=self.loop.num_steps, max_loras=limit, running_adapters=running[:limit],
            waiting_adapters=waiting, cache=self.cache.stats(), memory=self.memory,
            prefix_cache_queried_tokens=engine.blocks.num_queried_tokens,
            prefix_cache_hit_tokens=engine.blocks.num_hit_tokens,
        )
