"""Log-probabilities (`logprobs`, and the prompt's with `echo`) against peft's log-softmax of
the same model and adapter: teacher-forced over prompt + output, chunked prefill, mixed batches
with requests that ask for none, sync and asynchronous scheduling."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from tests.peft_helpers import make_peft_model, save_adapter

LOGPROB_ATOL = 2e-3  # fp32 through 30 layers (as tests/test_engine_peft.py's logits)
PROMPTS = ["The three most important rules of customer support are", "List three prime numbers and explain why."]


@pytest.fixture(scope="module")
def hf_base(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_model(hf_base):
    return make_peft_model(copy.deepcopy(hf_base), "r8-qv", seed=3, b_std=0.05)


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def engine(default_model_dir, peft_model, tmp_path_factory, request):
    # a 16-token step budget: the prompts are scored over several prefill chunks
    settings = Settings(max_loras=2, max_lora_rank=8, num_kv_blocks=128, kv_block_size=8, max_num_seqs=4,
                        max_num_batched_tokens=16, max_model_len=256, async_scheduling=request.param)
    e = Engine.from_dir(default_model_dir, settings)
    e.add_adapter("acme", save_adapter(peft_model, tmp_path_factory.mktemp("acme")))
    return e


def _reference(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row j is log p(. | ids[:j+1]) by the reference model."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _check(entry, expected_row: torch.Tensor, n: int):
    assert entry.logprob == pytest.approx(expected_row[entry.token_id].item(), abs=LOGPROB_ATOL)
    assert len(entry.top) == n
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)  # most likely first
    for token, value in entry.top:
        assert value == pytest.approx(expected_row[token].item(), abs=LOGPROB_ATOL)
    if n:  # the reference's own top-n in its order, where no near-tie makes the order moot
        ref_values, ref_ids = expected_row.topk(n + 1)
        assert values == pytest.approx(ref_values[:n].tolist(), abs=LOGPROB_ATOL)
        for i in range(n):
            neighbours = [ref_values[j] for j in (i - 1, i + 1) if j >= 0]
            if all(abs(ref_values[i] - v) > 2 * LOGPROB_ATOL for v in neighbours):
                assert entry.top[i][0] == ref_ids[i].item()


@pytest.mark.parametrize("adapter", [None, "acme"])
def test_logprobs_and_prompt_logprobs_match_peft(engine, hf_base, peft_model, adapter):
    model = peft_model if adapter else hf_base
    asked = [GenerationRequest(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=n,
                                                 prompt_logprobs=n), adapter=adapter)
             for p, n in zip(PROMPTS, (5, 0))]
    # in the same batches: requests asking for nothing, sampled ones, another adapter or none
    others = [GenerationRequest("Hello there, how", SamplingParams(max_tokens=5, temperature=0.8, seed=1)),
              GenerationRequest("Once upon a time", SamplingParams(max_tokens=7, temperature=0), adapter="acme")]
    results = engine.generate(asked + others)
    for request, result in zip(asked, results):
        n = request.sampling.logprobs
        ids = engine.encode(request)
        expected = _reference(model, ids + result.token_ids)
        assert len(result.logprobs) == len(result.token_ids)
        for i, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
            assert entry.token_id == token
            _check(entry, expected[len(ids) + i - 1], n)
            if i == 0:  # greedy: the token drawn is the most likely one
                assert expected[len(ids) - 1].argmax().item() == token
        assert [e.token_id for e in result.prompt_logprobs] == ids
        assert result.prompt_logprobs[0].logprob is None
        for j in range(1, len(ids)):  # teacher-forced: position j scored by the logits at j - 1
            _check(result.prompt_logprobs[j], expected[j - 1], n)
    assert all(r.logprobs is None and r.prompt_logprobs is None for r in results[len(asked):])


def test_sampled_tokens_logprobs_are_before_temperature(engine, hf_base):
    request = GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=4, temperature=1.7, seed=5, ignore_eos=True,
                                                           logprobs=2))
    (result,) = engine.generate([request])
    ids = engine.encode(request)
    expected = _reference(hf_base, ids + result.token_ids)
    for i, entry in enumerate(result.logprobs):
        _check(entry, expected[len(ids) + i - 1], 2)
