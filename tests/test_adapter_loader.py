"""The disk -> host reader (server/lora/loader.py) against independent oracles: the upload
parser's tensors (which read the file with safetensors itself), safetensors' own header parser,
and files damaged by hand."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from server.lora.loader import read_safetensors_header, read_stored_adapter  # noqa: E402
from server.lora.peft import AdapterValidationError, load_peft_adapter  # noqa: E402
from server.lora.store import AdapterStore  # noqa: E402
from server.model.config import ModelConfig  # noqa: E402
from tests.peft_helpers import DORA_CONFIGS, LORA_CONFIGS, save_random_tiny_adapter  # noqa: E402

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128)
MODEL = ModelConfig.from_hf_dict(LLAMA.to_dict())
LORAS = {**{name: LORA_CONFIGS[name] for name in ("r16-all-linear-rslora", "patterns", "layers-to-transform")},
         "r8-qv": LORA_CONFIGS["r8-qv"], "dora": DORA_CONFIGS["dora-r4-all-linear-patterns"]}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """name -> (store, record, config bytes, weights bytes) of peft-saved adapters."""
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    out = {}
    for seed, (name, kwargs) in enumerate(sorted(LORAS.items())):
        directory = save_random_tiny_adapter(LLAMA, kwargs, seed, tmp_path_factory.mktemp(name))
        config = (directory / "adapter_config.json").read_bytes()
        weights = (directory / "adapter_model.safetensors").read_bytes()
        record = store.put(name, config, weights, lambda c, w: load_peft_adapter(c, w, MODEL, max_rank=64))
        out[name] = (store, record, config, weights)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LORAS))
def test_stored_adapter_reads_as_the_upload_parser_sees_it(stored, name, dtype):
    store, record, config, weights = stored[name]
    expected = load_peft_adapter(config, weights, MODEL, max_rank=64, dtype=dtype)
    ours = read_stored_adapter(store, record, MODEL, max_rank=64, dtype=dtype)
    assert (ours.rank, ours.alpha, ours.use_rslora, ours.target_modules) == \
        (expected.rank, expected.alpha, expected.use_rslora, expected.target_modules)
    assert ours.modules.keys() == expected.modules.keys() and ours.nbytes == expected.nbytes
    for key, m in expected.modules.items():
        got = ours.modules[key]
        assert torch.equal(got.lora_a, m.lora_a) and torch.equal(got.lora_b, m.lora_b), key
        assert got.lora_a.dtype == dtype and got.scale == m.scale
        assert (got.magnitude is None) == (m.magnitude is None) == (not expected.use_dora), key
        assert m.magnitude is None or (got.magnitude.dtype == torch.float32 and torch.equal(got.magnitude, m.magnitude))
    assert ours.use_dora == expected.use_dora == (name == "dora")
    # every A and B is a view of one buffer holding exactly their bytes (DoRA magnitudes beside it)
    magnitude_bytes = sum(m.magnitude.nbytes for m in ours.modules.values() if m.magnitude is not None)
    assert ours.buffer.is_contiguous() and ours.buffer.nbytes == ours.nbytes - magnitude_bytes
    assert all(m.lora_a.untyped_storage().data_ptr() == ours.buffer.untyped_storage().data_ptr()
               for m in ours.modules.values())


def test_a_stored_adapter_over_this_servers_max_rank_fails_cleanly(stored):
    store, record, _, _ = stored["r16-all-linear-rslora"]
    with pytest.raises(AdapterValidationError, match="exceeds this server's max_rank 8"):
        read_stored_adapter(store, record, MODEL, max_rank=8, dtype=torch.float32)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "a": torch.randn(2, 7, generator=gen),
            "c": torch.randn(4, generator=gen).double()}


def _header_of(raw: bytes, path) -> tuple[int, dict]:
    path.write_bytes(raw)
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_safetensors_header(fd, len(raw))
    finally:
        os.close(fd)


def _with_header(raw: bytes, edit) -> bytes:
    """The file with its JSON header edited by `edit(header)` (the data section kept)."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def test_header_matches_safetensors_own_reading(tmp_path):
    raw = save(_tensors(), metadata={"format": "pt"})
    start, entries = _header_of(raw, tmp_path / "ok.safetensors")
    with safe_open(tmp_path / "ok.safetensors", framework="pt") as f:
        assert sorted(entries) == sorted(f.keys())
        for name in f.keys():
            tensor = f.get_tensor(name)
            entry = entries[name]
            assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
            data = raw[start + entry.begin : start + entry.end]
            assert torch.equal(torch.frombuffer(bytearray(data), dtype=entry.dtype).view(entry.shape), tensor)


def _shift(name: str, by: int):
    def edit(header):
        header[name]["data_offsets"] = [v + by for v in header[name]["data_offsets"]]
    return edit


@pytest.mark.parametrize("damage, problem", [
    (lambda raw: raw[:6], "shorter than"),
    (lambda raw: struct.pack("<Q", 10**9) + raw[8:], "header length"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "not JSON"),
    (lambda raw: raw + b"\0\0", "covers"),  # trailing bytes beyond the tensors
    (lambda raw: _with_header(raw, lambda h: h["a"].update(dtype="Q7")), "bad header entry"),
    (lambda raw: _with_header(raw, lambda h: h["a"].update(shape=[2, 6])), "bytes for shape"),
    (lambda raw: _with_header(raw, lambda h: h["a"].update(shape=[2, -7])), "bad header entry"),
    (lambda raw: _with_header(raw, _shift("a", -2)), "overlaps or leaves gaps"),
    (lambda raw: _with_header(raw, _shift("b", 2)), "overlaps or leaves gaps"),
])
def test_malformed_headers_are_refused(tmp_path, damage, problem):
    raw = save(_tensors())
    with pytest.raises(AdapterValidationError, match=f"not a valid safetensors file: .*{problem}") as info:
        _header_of(damage(raw), tmp_path / "bad.safetensors")
    assert info.value.field == "adapter_model"
