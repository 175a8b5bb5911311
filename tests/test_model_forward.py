"""Our flattened-batch forward against transformers' own model (fp32, random weights)."""

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import CheckpointError, load_model
from server.model.runner import ModelRunner, SequenceChunk
from tests.tiny_models import TINY_CONFIGS, build_tiny

ATOL = 2e-5


def _runner(model, num_blocks=64, block_size=4):
    c = model.config
    kv = KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    return ModelRunner(model, kv, "cpu")


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_tiny(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path, torch.float32, "cpu")


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_prefill_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 128, (13,)).tolist()
    logits = _runner(ours).run([SequenceChunk(ids, 0, [7, 2, 9, 4])], all_logits=True)
    torch.testing.assert_close(logits, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_mixed_prefill_and_decode_batch_matches_each_sequence_alone(pair):
    """Three sequences of different lengths, scattered blocks, one step mixing a prefill,
    a chunked-prefill continuation and a decode: each row equals transformers on that sequence."""
    hf, ours = pair
    runner = _runner(ours)
    a = torch.randint(0, 128, (9,)).tolist()
    b = torch.randint(0, 128, (17,)).tolist()
    c = torch.randint(0, 128, (6,)).tolist()
    tables = {"a": [10, 3, 21], "b": [5, 30, 1, 8, 12], "c": [40, 41]}
    # step 1: prefill a fully and the first 10 tokens of b
    runner.run([SequenceChunk(a[:-1], 0, tables["a"]), SequenceChunk(b[:10], 0, tables["b"])])
    # step 2: a decodes its last token, b finishes its prompt, c prefills
    logits = runner.run([
        SequenceChunk(a[-1:], len(a) - 1, tables["a"]),
        SequenceChunk(b[10:], 10, tables["b"]),
        SequenceChunk(c, 0, tables["c"]),
    ])
    for row, ids in enumerate((a, b, c)):
        torch.testing.assert_close(logits[row], _hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)


def test_decode_only_batch_matches(pair):
    hf, ours = pair
    runner = _runner(ours)
    seqs = [torch.randint(0, 128, (n,)).tolist() for n in (3, 12, 7, 1)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(seqs))]
    runner.run([SequenceChunk(s[:-1], 0, t) for s, t in zip(seqs, tables) if len(s) > 1])
    logits = runner.run([SequenceChunk(s[-1:], len(s) - 1, t) for s, t in zip(seqs, tables)])
    for row, ids in enumerate(seqs):
        torch.testing.assert_close(logits[row], _hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build_tiny("llama-gqa")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.1.mlp.gate_up_proj"):
        load_model(tmp_path, torch.float32, "cpu")


def test_wrong_shape_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build_tiny("llama-gqa")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.randn(5, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="k_proj"):
        load_model(tmp_path, torch.float32, "cpu")
