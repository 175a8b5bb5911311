"""Issue 16 on the GPU path (decode graphs, asynchronous scheduling, bf16/fp32 on CUDA): logprobs,
prefix caching and structured outputs against the eager synchronous engine and the CPU's answers.
Run on the H200: `python3 -m pytest -m gpu tests/test_prefix_logprobs_structured_gpu.py`."""

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the H200 through the device tool)"),
]

from loadtest.random_model import StubTokenizer, random_adapter, random_model  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402

SMALL = dict(
    architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=512, intermediate_size=1024,
    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
    max_position_embeddings=2048, rope_theta=10000.0,
)
KV = ("k_proj", "v_proj")


def _engine(tokenizer=None, enforce_eager=False, async_scheduling="on", caching=True, dtype=torch.float32) -> Engine:
    model = random_model(SMALL, dtype, "cuda", seed=1)
    settings = Settings(device="cuda", max_loras=4, max_lora_rank=16, max_num_seqs=16, num_kv_blocks=256,
                        max_model_len=1024, enforce_eager=enforce_eager, async_scheduling=async_scheduling,
                        enable_prefix_caching=caching)
    engine = Engine(model, tokenizer or StubTokenizer(), settings)
    for i, modules in enumerate((KV, ("q_proj",))):
        engine.add_adapter(f"a{i}", random_adapter(model.config, 8, modules, seed=10 + i, device="cuda", dtype=dtype,
                                                   b_std=0.05))
    return engine


def _shared_prefix_requests(n_tokens=6, logprobs=None):
    gen = torch.Generator().manual_seed(3)
    system = torch.randint(1, 49152, (200,), generator=gen).tolist()
    requests = []
    for i, adapter in enumerate([None, "a0", "a1", None, "a0", "a1"]):
        turn = torch.randint(1, 49152, (int(5 + 7 * i),), generator=gen).tolist()
        requests.append(GenerationRequest(system + turn, SamplingParams(max_tokens=n_tokens, temperature=0,
                                                                        ignore_eos=True, logprobs=logprobs),
                                          adapter=adapter))
    return requests


def test_prefix_cache_with_graphs_and_async_gives_the_tokens_without_it():
    """fp32: the cache on (graphs, async) against the cache off (eager, sync): same tokens, hits counted."""
    requests = _shared_prefix_requests(n_tokens=12)
    reference = _engine(enforce_eager=True, async_scheduling="off", caching=False)
    expected = [r.token_ids for r in reference.generate(requests)]
    del reference
    engine = _engine()
    engine.generate(requests[:3])  # the system prompt cached under each namespace
    assert [r.token_ids for r in engine.generate(requests)] == expected
    assert engine.blocks.num_hit_tokens >= 3 * 192
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_logprobs_with_graphs_and_async_equal_the_eager_engine():
    requests = _shared_prefix_requests(logprobs=4)
    requests[1] = GenerationRequest(requests[1].prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                                       logprobs=2, prompt_logprobs=2), adapter="a0")
    eager = _engine(enforce_eager=True, async_scheduling="off", caching=False).generate(requests)
    graphs = _engine().generate(requests)
    for a, b in zip(eager, graphs):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-3
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert graphs[1].prompt_logprobs is not None and len(graphs[1].prompt_logprobs) == len(requests[1].prompt)
    for x, y in zip(eager[1].prompt_logprobs[1:], graphs[1].prompt_logprobs[1:]):
        assert abs(x.logprob - y.logprob) < 1e-3


def _tokenizer():
    from transformers import AutoTokenizer

    for candidate in (Path(".bench/tokenizer"), Path("~/.cache/loraplex/models/SmolLM2-135M-Instruct").expanduser()):
        if (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    pytest.skip("no SmolLM2 tokenizer (.bench/tokenizer, as loadtest/gpu_session.sh serving has it)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_structured_outputs_mixed_with_free_form_under_graphs_and_async(dtype):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["x", "y"]}}},
              "required": ["colour", "n", "tags"], "additionalProperties": False}
    engine = _engine(_tokenizer(), dtype=dtype)
    free = _shared_prefix_requests(n_tokens=10)[:3]
    alone = [engine.generate([r])[0].token_ids for r in free]
    constrained = [GenerationRequest(r.prompt, SamplingParams(max_tokens=64, temperature=t, seed=i,
                                                              json_schema=json.dumps(schema)), adapter=r.adapter)
                   for i, (r, t) in enumerate(zip(_shared_prefix_requests(), [0, 1.0, 0.7, 0, 1.0, 0.5]))]
    results = engine.generate(constrained + free)
    for result in results[:len(constrained)]:
        value = json.loads(result.text)
        assert value["colour"] in ("red", "green") and 0 <= value["n"] <= 99 and len(value["tags"]) <= 2
        assert result.finish_reason == "stop"
    if dtype == torch.float32:  # bf16 GEMMs may round differently in another batch shape
        assert [r.token_ids for r in results[len(constrained):]] == alone
