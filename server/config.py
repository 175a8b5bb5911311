"""One settings object, built once from CLI flags and `LORAPLEX_*` environment variables.

Nothing else in loraplex reads the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from server.model.config import LORA_TARGET_MODULES

# Prometheus metric names (legacy charset): the gateway alias settings are checked against it.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _default_home() -> Path:
    return Path(os.path.expanduser("~/.cache/loraplex"))


HOST_CACHE_FRACTION = 0.25  # of the available memory: the adapter cache's host tier unless set


def default_host_cache_bytes() -> int:
    """A quarter of the memory available now (`available_memory_bytes`), or 2 GiB where that is
    unknown. A quarter, because on a GPU server the tier is page-locked (never swapped, and
    PyTorch's allocator rounds each adapter's buffer up to a power of two) and the model's
    loading and the API process need the rest."""
    available = available_memory_bytes()
    return int(HOST_CACHE_FRACTION * available) if available else 2 << 30


def available_memory_bytes() -> int | None:
    """Memory this process could still take: MemAvailable of /proc/meminfo, capped by its cgroup's
    limit less the cgroup's usage (containers); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max": no limit
            found.append(max(0, int(limit) - usage))
        break
    return min(found) if found else None


@dataclass(frozen=True)
class Settings:
    home: Path = _default_home()  # LORAPLEX_HOME: prepared models and the adapter store live here
    model: str | None = None  # LORAPLEX_MODEL: checkpoint dir or .gguf; None = embedded SmolLM2
    device: str = "auto"  # LORAPLEX_DEVICE: auto | cpu | cuda[:N]
    dtype: str = "auto"  # LORAPLEX_DTYPE: auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    # LORAPLEX_QUANTIZE: "" (none) | nf4 | fp8: the base model's projection weights, quantized as they load
    # (server/model/quantized.py); adapters, embeddings, norms and the LM head stay in `dtype`
    quantize: str = ""
    max_lora_rank: int = 64  # LORAPLEX_MAX_LORA_RANK
    max_loras: int = 0  # LORAPLEX_MAX_LORAS: adapter slots on the device; 0 = auto (8 on CPU, by memory on GPU)
    lora_memory_fraction: float = 0.2  # LORAPLEX_LORA_MEMORY_FRACTION: share of GPU memory for adapter slots when max_loras is auto
    # LORAPLEX_LORA_MODULES: the modules adapters may target, whose rows the device pool holds: all,
    # attention (q,k,v,o), mlp (gate,up,down) or a comma-separated list of q_proj ... down_proj. A
    # page of a 70B pool is 445 MB at rank 16 with every module, 131 MB with attention only.
    lora_modules: str = "all"
    kv_block_size: int = 16  # LORAPLEX_KV_BLOCK_SIZE: tokens per KV cache block
    num_kv_blocks: int = 0  # LORAPLEX_NUM_KV_BLOCKS: 0 = derive from max_num_seqs x context
    max_num_seqs: int = 0  # LORAPLEX_MAX_NUM_SEQS: 0 = auto (256 on GPU, 32 on CPU)
    gpu_memory_utilization: float = 0.9  # LORAPLEX_GPU_MEMORY_UTILIZATION: share of GPU memory for weights, adapters and KV cache
    max_num_batched_tokens: int = 2048  # LORAPLEX_MAX_NUM_BATCHED_TOKENS: tokens per step (prefill chunks + decodes)
    max_model_len: int = 0  # LORAPLEX_MAX_MODEL_LEN: 0 = min(model limit, 8192)
    enforce_eager: bool = False  # LORAPLEX_ENFORCE_EAGER: no CUDA graphs for decode steps (debugging)
    # LORAPLEX_ENABLE_PREFIX_CACHING: full KV blocks shared by later requests with the same prefix and
    # adapter (server/engine/block_manager.py); 0 = every prompt computed in full
    enable_prefix_caching: bool = True
    # LORAPLEX_ASYNC_SCHEDULING: auto (on the GPU) | on | off: schedule step N+1 while the device runs step N
    async_scheduling: str = "auto"
    # LORAPLEX_TENSOR_PARALLEL_SIZE: the base model split over this many GPUs of the host (rank r on
    # cuda:r), or CPU processes; 1 = one process (server/engine/tp_group.py)
    tensor_parallel_size: int = 1
    # LORAPLEX_BLAS_LIBRARY: auto (cuBLASLt on the GPU) | cublas | cublaslt: the library torch hands the
    # projections' GEMMs to (loadtest/bench_gemm.py: cuBLASLt is faster on most serving shapes)
    blas_library: str = "auto"
    # --- HTTP server
    host: str = "127.0.0.1"  # LORAPLEX_HOST
    port: int = 8000  # LORAPLEX_PORT
    served_model_name: str = ""  # LORAPLEX_SERVED_MODEL_NAME: the base model's id in the API; "" = its directory name
    # LORAPLEX_ADMIN_TOKEN: bearer token of the admin API; unset = the admin API refuses every call
    admin_token: str = field(default="", repr=False)
    api_keys_file: str = ""  # LORAPLEX_API_KEYS_FILE: JSON {"<api key>": "<customer id>"}; "" = trust X-Customer-Id
    adapter_store: str = ""  # LORAPLEX_ADAPTER_STORE: the adapter store directory; "" = <home>/adapters
    # LORAPLEX_ADAPTER_STORE_SHARED: the store is one volume shared by several replicas
    # (server/lora/shared_store.py): cross-process locks, retired versions kept for the retention
    adapter_store_shared: bool = False
    # LORAPLEX_ADAPTER_STORE_RETENTION_SECONDS: how long a shared store keeps a replaced or deleted
    # version; 0 = max_request_seconds + 60
    adapter_store_retention_seconds: float = 0.0
    adapter_store_poll_seconds: float = 5.0  # LORAPLEX_ADAPTER_STORE_POLL_SECONDS: a shared store's sweep period
    # LORAPLEX_HOST_CACHE_BYTES: host RAM tier of the adapter cache; default HOST_CACHE_FRACTION of the
    # memory available when the settings are made (see default_host_cache_bytes)
    host_cache_bytes: int = field(default_factory=lambda: default_host_cache_bytes())
    # Admission (server/admission.py): generations waiting for their first token, beyond which a
    # request gets 429 with Retry-After at once; 0 = no bound
    max_queued_requests: int = 1024  # LORAPLEX_MAX_QUEUED_REQUESTS: server-wide
    max_queued_requests_per_tenant: int = 256  # LORAPLEX_MAX_QUEUED_REQUESTS_PER_TENANT: one tenant's share
    max_requests_per_tenant: int = 0  # LORAPLEX_MAX_REQUESTS_PER_TENANT: one tenant's queued + running
    # LORAPLEX_MAX_REQUEST_SECONDS: a generation request's deadline from its arrival (a client may ask
    # for less with the X-Request-Timeout header); past it the request ends with a deadline error; 0 = none
    max_request_seconds: float = 600.0
    max_queued_tokens: int = 1 << 20  # LORAPLEX_MAX_QUEUED_TOKENS: prompt tokens of the queued generations
    max_queued_tokens_per_tenant: int = 1 << 18  # LORAPLEX_MAX_QUEUED_TOKENS_PER_TENANT
    max_upload_bytes: int = 1 << 30  # LORAPLEX_MAX_UPLOAD_BYTES: one adapter upload (both files)
    max_request_body_bytes: int = 16 << 20  # LORAPLEX_MAX_REQUEST_BODY_BYTES: any other request's body (413 past it)
    max_connections: int = 4096  # LORAPLEX_MAX_CONNECTIONS: uvicorn answers 503 past this many at once; 0 = no bound
    # LORAPLEX_DRAIN_SECONDS: after SIGTERM, how long requests in flight may run on (not ready, new requests
    # 503) before the rest end with an error and the server exits (server/api/drain.py)
    drain_seconds: float = 20.0
    max_concurrent_uploads: int = 2  # LORAPLEX_MAX_CONCURRENT_UPLOADS: uploads validated at once (memory bound)
    # LORAPLEX_SHARED_ADAPTERS: the adapters a composition (POST /admin/adapters/{id}/compose) may read
    # besides the customer's own: comma-separated customer ids, "*" = every stored adapter, "none" = none
    shared_adapters: str = "*"
    # Names of the gauges the Gateway API Inference Extension's endpoint picker reads, exported beside
    # the loraplex_* originals; comma-separated, "none" = do not export. Defaults: vLLM's names (the EPP's).
    gateway_queue_metric: str = "vllm:num_requests_waiting"  # LORAPLEX_GATEWAY_QUEUE_METRIC
    gateway_running_metric: str = "vllm:num_requests_running"  # LORAPLEX_GATEWAY_RUNNING_METRIC
    # LORAPLEX_GATEWAY_KV_USAGE_METRIC: vLLM renamed it; older endpoint pickers read the old name
    gateway_kv_usage_metric: str = "vllm:kv_cache_usage_perc,vllm:gpu_cache_usage_perc"
    gateway_lora_info_metric: str = "vllm:lora_requests_info"  # LORAPLEX_GATEWAY_LORA_INFO_METRIC

    def lora_module_set(self) -> frozenset[str]:
        """The PEFT module names adapters may target (LORAPLEX_LORA_MODULES)."""
        return lora_module_set(self.lora_modules)

    def restricted_lora_modules(self) -> frozenset[str] | None:
        """lora_module_set(), or None when it is every module (nothing to restrict)."""
        modules = self.lora_module_set()
        return None if modules == frozenset(LORA_TARGET_MODULES) else modules

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """Defaults, then LORAPLEX_* variables, then explicit overrides (CLI flags; None = unset)."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"LORAPLEX_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser()
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        if self.max_loras < 0 or self.max_num_seqs < 0:
            raise ValueError("max_loras and max_num_seqs must be >= 0 (0 = auto)")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0 < self.lora_memory_fraction < 1:
            raise ValueError("lora_memory_fraction must be in (0, 1)")
        self.lora_module_set()  # raises on an unknown name
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_block_size < 1:
            raise ValueError("kv_block_size must be >= 1")
        if self.async_scheduling not in {"auto", "on", "off"}:
            raise ValueError(f"async_scheduling must be auto, on or off, not {self.async_scheduling!r}")
        if self.drain_seconds < 0:
            raise ValueError("drain_seconds must be >= 0")
        if self.blas_library not in {"auto", "cublas", "cublaslt"}:
            raise ValueError(f"blas_library must be auto, cublas or cublaslt, not {self.blas_library!r}")
        if self.quantize not in {"", "none", "nf4", "fp8"}:
            raise ValueError(f"quantize must be nf4, fp8 or none, not {self.quantize!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.dtype not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        if min(self.max_queued_requests, self.max_queued_requests_per_tenant, self.max_requests_per_tenant,
               self.max_queued_tokens, self.max_queued_tokens_per_tenant) < 0:
            raise ValueError("the admission bounds (max_queued_requests[_per_tenant], max_requests_per_tenant, "
                             "max_queued_tokens[_per_tenant]) must be >= 0 (0 = no bound)")
        if self.max_request_body_bytes < 1 or self.max_connections < 0:
            raise ValueError("max_request_body_bytes must be >= 1 and max_connections >= 0 (0 = no bound)")
        if self.max_request_seconds < 0:
            raise ValueError("max_request_seconds must be >= 0 (0 = no deadline)")
        if self.host_cache_bytes < 0 or self.max_upload_bytes < 1 or self.max_concurrent_uploads < 1:
            raise ValueError("host_cache_bytes must be >= 0, max_upload_bytes and max_concurrent_uploads >= 1")
        if self.adapter_store_poll_seconds <= 0:
            raise ValueError("adapter_store_poll_seconds must be > 0")
        if self.adapter_store_shared:
            self.adapter_store_retention()  # raises when no deadline bounds a request's life
        for name in ("gateway_queue_metric", "gateway_running_metric", "gateway_kv_usage_metric",
                     "gateway_lora_info_metric"):
            for metric in _names(getattr(self, name)):
                if not _METRIC_NAME.fullmatch(metric):
                    raise ValueError(f"{name}: {metric!r} is not a valid Prometheus metric name")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapter_store_dir(self) -> Path:
        return Path(self.adapter_store).expanduser() if self.adapter_store else self.home / "adapters"

    def adapter_store_retention(self) -> float | None:
        """Seconds a shared store keeps retired versions; None for a store this process owns."""
        if not self.adapter_store_shared:
            return None
        from server.lora.shared_store import retention_seconds  # no torch: a light import

        return retention_seconds(self.max_request_seconds, self.adapter_store_retention_seconds)

    @property
    def shared_adapter_ids(self) -> frozenset[str] | None:
        """Customer ids whose adapters any composition may read; None = every adapter."""
        return None if self.shared_adapters.strip() == "*" else frozenset(_names(self.shared_adapters))

    def gateway_metric_names(self, name: str) -> list[str]:
        """The alias names configured in `gateway_<name>_metric` (queue, running, kv_usage, lora_info)."""
        return _names(getattr(self, f"gateway_{name}_metric"))


def _names(value: str) -> list[str]:
    if value.strip().lower() == "none":
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def _coerce(name: str, raw: str, type_name) -> object:
    type_name = str(type_name)
    if type_name.startswith("bool"):
        if raw.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"LORAPLEX_{name.upper()}={raw!r} is not a boolean (1/0, true/false)")
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"LORAPLEX_{name.upper()}={raw!r} is not a valid {type_name}") from exc
    return raw


_LORA_MODULE_GROUPS = {"all": LORA_TARGET_MODULES, "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                       "mlp": ("gate_proj", "up_proj", "down_proj")}


def lora_module_set(spec: str) -> frozenset[str]:
    """"all", "attention", "mlp", or comma-separated module names -> the set of names."""
    names = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in _LORA_MODULE_GROUPS:
            names.update(_LORA_MODULE_GROUPS[part])
        elif part in LORA_TARGET_MODULES:
            names.add(part)
        else:
            raise ValueError(f"lora_modules: {part!r} is not all, attention, mlp or one of {', '.join(LORA_TARGET_MODULES)}")
    return frozenset(names)
