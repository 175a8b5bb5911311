"""A corpus of malformed adapters uploaded while traffic runs (issue 12, item 4).

Each case breaks one thing of a good upload (the config's JSON, each config field out of range,
the safetensors header and data: truncated, huge, garbage, lying offsets and dtypes, duplicate
keys, wrong shapes, non-finite values, pickles under every name, the multipart form itself).
Every one, sent both as a replacement of a stored adapter and as a first upload, must get a 4xx
whose message names the problem; meanwhile steady completion traffic (base model and the stored
adapter) keeps returning exactly what it returned before; and afterwards the store is byte for
byte as it was.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zipfile

import httpx
import torch
from safetensors.torch import save

from server.model.config import ModelConfig
from tests.test_api_admin import AUTH, adapter_files, model_config, server  # noqa: F401  (fixtures)

PREFIX = "base_model.model.model.layers.{layer}.self_attn.{module}"


def _header_file(header: dict | list | str, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header written by hand (lies included) and raw data."""
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _with_header(weights: bytes, change) -> bytes:
    """The good file with its header edited by `change(header)` (the data left as it was)."""
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    change(header)
    return _header_file(header, weights[8 + n :])


def _first_key(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _tensors(model: ModelConfig, rank: int = 4, **override) -> bytes:
    shapes = model.linear_shapes()
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(model.num_layers):
        for module in ("q_proj", "v_proj"):
            fan_in, fan_out = shapes[module]
            key = PREFIX.format(layer=layer, module=module)
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    for key, value in override.items():
        if value is None:
            tensors.pop(key.replace("__", "."), None)
        else:
            tensors[key.replace("__", ".")] = value
    return save(tensors)


def _pickle(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _config(**fields) -> bytes:
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


_DROP = object()


def corpus(model: ModelConfig) -> dict[str, tuple[bytes, bytes, str]]:
    """name -> (adapter_config.json bytes, adapter_model.safetensors bytes, what the message names)."""
    config, weights = adapter_files(model, rank=4)
    a0 = PREFIX.format(layer=0, module="q_proj") + ".lora_A.weight"
    b0 = PREFIX.format(layer=0, module="q_proj") + ".lora_B.weight"
    fan_in = model.linear_shapes()["q_proj"][0]
    cases = {
        # adapter_config.json
        "config-not-json": (b"{not json", weights, "not valid JSON"),
        "config-not-utf8": (b"\xff\xfe{}", weights, "adapter_config"),
        "config-a-list": (b"[1, 2]", weights, "adapter_config"),
        "config-a-string": (b'"LORA"', weights, "adapter_config"),
        "config-empty": (b"", weights, "adapter_config"),
        "config-empty-object": (b"{}", weights, "peft_type"),
        "config-nan-token": (config.replace(b'"lora_alpha": 8', b'"lora_alpha": NaN'), weights, "lora_alpha"),
        "peft-type-prefix": (_config(peft_type="PREFIX_TUNING"), weights, "LORA"),
        "peft-type-missing": (_config(peft_type=_DROP), weights, "peft_type"),
        "peft-type-number": (_config(peft_type=7), weights, "peft_type"),
        "r-zero": (_config(r=0), weights, "r"),
        "r-negative": (_config(r=-4), weights, "r"),
        "r-string": (_config(r="4"), weights, "r"),
        "r-float": (_config(r=4.5), weights, "r"),
        "r-bool": (_config(r=True), weights, "r"),
        "r-huge": (_config(r=10**12), weights, "r"),
        "r-over-max-rank": (_config(r=16), _tensors(model, rank=16), "max_rank"),
        "r-missing": (_config(r=_DROP), weights, "r"),
        "r-differs-from-tensors": (_config(r=8), weights, "rank"),
        "alpha-string": (_config(lora_alpha="eight"), weights, "lora_alpha"),
        "alpha-infinite": (config.replace(b'"lora_alpha": 8', b'"lora_alpha": 1e999'), weights, "lora_alpha"),
        "target-modules-empty": (_config(target_modules=[]), weights, "target_modules"),
        "target-modules-numbers": (_config(target_modules=[1, 2]), weights, "target_modules"),
        "target-modules-lm-head": (_config(target_modules=["lm_head"]), weights, "lm_head"),
        "target-modules-unknown": (_config(target_modules=["q_proj", "conv9"]), weights, "conv9"),
        "use-dora": (_config(use_dora=True), weights, "DoRA"),
        "bias-all": (_config(bias="all"), weights, "bias"),
        "modules-to-save": (_config(modules_to_save=["lm_head"]), weights, "modules_to_save"),
        "rslora-not-bool": (_config(use_rslora="yes"), weights, "use_rslora"),
        "rank-pattern-bad": (_config(rank_pattern={"q_proj": "big"}), weights, "rank_pattern"),
        # adapter_model.safetensors: the container
        "weights-empty": (config, b"", "safetensors"),
        "weights-seven-bytes": (config, b"\x01" * 7, "safetensors"),
        "weights-header-length-huge": (config, _header_file({}, length=2**62), "safetensors"),
        "weights-header-past-end": (config, _header_file({}, length=1 << 20), "safetensors"),
        "weights-header-not-json": (config, _header_file("{not json"), "safetensors"),
        "weights-header-a-list": (config, _header_file([1, 2, 3]), "safetensors"),
        "weights-header-not-utf8": (config, struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "safetensors"),
        "weights-garbage": (config, bytes(range(256)) * 64, "safetensors"),
        "weights-truncated": (config, weights[: len(weights) // 2], "safetensors"),
        "weights-trailing-bytes": (config, weights + b"\x00" * 64, "safetensors"),
        "weights-offsets-past-data": (config, _with_header(weights, lambda h: h[_first_key(h)].update(
            data_offsets=[0, 10**9])), "safetensors"),
        "weights-offsets-reversed": (config, _with_header(weights, lambda h: h[_first_key(h)].update(
            data_offsets=list(reversed(h[_first_key(h)]["data_offsets"])))), "safetensors"),
        "weights-offsets-negative": (config, _with_header(weights, lambda h: h[_first_key(h)].update(
            data_offsets=[-8, 8])), "safetensors"),
        "weights-dtype-lie": (config, _with_header(weights, lambda h: h[_first_key(h)].update(dtype="F64")),
                              "safetensors"),
        "weights-dtype-unknown": (config, _with_header(weights, lambda h: h[_first_key(h)].update(dtype="Q4")),
                                  "safetensors"),
        "weights-shape-lie": (config, _with_header(weights, lambda h: h[_first_key(h)].update(shape=[3, 3])),
                              "safetensors"),
        "weights-duplicate-keys": (config, _duplicated_key(weights), "twice"),
        "weights-metadata-not-strings": (config, _with_header(weights, lambda h: h.update(__metadata__={"x": 1})),
                                         "safetensors"),
        "weights-integer-dtype": (config, _tensors(model, **{a0.replace(".", "__"): torch.ones(4, fan_in,
                                                                                            dtype=torch.int32)}),
                                  "dtype"),
        "weights-bool-dtype": (config, _tensors(model, **{a0.replace(".", "__"): torch.ones(4, fan_in,
                                                                                         dtype=torch.bool)}),
                               "dtype"),
        # adapter_model.safetensors: the tensors
        "tensor-a-wrong-width": (config, _tensors(model, **{a0.replace(".", "__"): torch.ones(4, fan_in + 1)}),
                                 "does not fit the base model"),
        "tensor-b-wrong-rank": (config, _tensors(model, **{b0.replace(".", "__"): torch.ones(
            model.linear_shapes()["q_proj"][1], 3)}), "rank"),
        "tensor-a-3d": (config, _tensors(model, **{a0.replace(".", "__"): torch.ones(4, fan_in, 1)}), a0),
        "tensor-b-missing": (config, _tensors(model, **{b0.replace(".", "__"): None}), "lora_B"),
        "tensor-a-nan": (config, _tensors(model, **{a0.replace(".", "__"): torch.full((4, fan_in), float("nan"))}),
                         "NaN"),
        "tensor-b-inf": (config, _tensors(model, **{b0.replace(".", "__"): torch.full(
            (model.linear_shapes()["q_proj"][1], 4), float("inf"))}), "inf"),
        "tensor-layer-out-of-range": (config, _tensors(model, **{
            PREFIX.format(layer=999, module="q_proj").replace(".", "__") + "__lora_A__weight": torch.ones(4, fan_in)}),
            "999"),
        "tensor-unknown-module": (config, _tensors(model, **{
            "base_model__model__model__layers__0__self_attn__rotary__lora_A__weight": torch.ones(4, fan_in)}),
            "rotary"),
        "tensor-not-lora": (config, _tensors(model, **{"base_model__model__lm_head__weight": torch.ones(4, 4)}),
                            "lm_head"),
        "tensor-none-at-all": (config, save({}), "missing"),
        # pickles and archives, under the expected name
        "pickle-dict": (config, _pickle({a0: torch.ones(4, fan_in)}), "pickle"),
        "pickle-tensor": (config, _pickle(torch.ones(2)), "pickle"),
        "zip-archive": (config, _zip(), "safetensors"),
    }
    return cases


def _duplicated_key(weights: bytes) -> bytes:
    """The good file with its first tensor's entry written twice in the header (same offsets)."""
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    key = _first_key(header)
    entry = json.dumps(header[key])
    text = json.dumps(header)
    text = text.replace(f'"{key}": {entry}', f'"{key}": {entry}, "{key}": {entry}', 1)
    return _header_file(text, weights[8 + n :])


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_model.safetensors", b"not really")
    return buffer.getvalue()


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Traffic(threading.Thread):
    """Greedy completions (the base model's, or a stored adapter's), over and over, until
    stopped; each must return what it returned before the corpus went in."""

    def __init__(self, url: str, expected: dict):
        super().__init__(daemon=True)
        self.url, self.expected = url, expected
        self.stop = threading.Event()
        self.sent, self.problems = 0, []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                for tenant, text in self.expected.items():
                    got = _complete(http, tenant)
                    self.sent += 1
                    if got != text:
                        self.problems.append((tenant, got))


def _complete(http: httpx.Client, tenant: str | None) -> str:
    response = http.post("/v1/completions", headers={"X-Customer-Id": tenant} if tenant else {},
                         json={"prompt": "The weather today", "max_tokens": 4, "temperature": 0,
                               "ignore_eos": True})
    return response.json()["choices"][0]["text"] if response.status_code == 200 else f"HTTP {response.status_code}"


def test_every_malformed_adapter_is_refused_with_its_reason_while_traffic_runs(server, model_config):
    cases = corpus(model_config)
    assert len(cases) >= 50
    root = server.settings.adapter_store_dir
    with httpx.Client(base_url=server.url, timeout=120) as http:
        good = adapter_files(model_config, rank=4)
        files = {"adapter_config": ("adapter_config.json", good[0]), "adapter_model": ("adapter_model.safetensors",
                                                                                     good[1])}
        assert http.put("/admin/adapters/steady", files=files, headers=AUTH).status_code == 201
        expected = {None: _complete(http, None), "steady": _complete(http, "steady")}
        before = _tree(root)
        traffic = [Traffic(server.url, {tenant: text}) for tenant, text in expected.items()]
        for thread in traffic:
            thread.start()
        while not all(t.sent for t in traffic):  # both streams of requests flowing before the corpus goes in
            assert all(t.is_alive() for t in traffic)
            time.sleep(0.01)
        wrong = []
        try:
            for name, (config, weights, needle) in cases.items():
                for customer in ("steady", f"new-{name}"):  # a replacement and a first upload
                    files = {"adapter_config": ("adapter_config.json", config),
                             "adapter_model": ("adapter_model.safetensors", weights)}
                    response = http.put(f"/admin/adapters/{customer}", files=files, headers=AUTH)
                    message = _message(response)
                    if not (400 <= response.status_code < 500 and needle.lower() in message.lower()):
                        wrong.append((name, customer, response.status_code, message[:200]))
        finally:
            for thread in traffic:
                thread.stop.set()
                thread.join(120)
        after = _tree(root)
        assert http.get("/ready").status_code == 200
    sent = sum(t.sent for t in traffic)
    print(f"{len(cases)} malformed adapters x 2 uploads refused; {sent} completions alongside")
    assert not wrong, f"{len(wrong)} uploads not refused as they should be: {wrong}"
    assert all(t.sent >= 2 for t in traffic) and not any(t.problems for t in traffic), [t.problems for t in traffic]
    assert after == before  # byte for byte, no temp files, no new customer directory


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text
