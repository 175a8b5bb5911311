"""Engine behaviour on the default model: stops, limits, seeds, preemption, adapter slots,
with and without asynchronous scheduling (step N+1 launched before step N's tokens are read)."""

import pytest
import torch

from loadtest.random_model import random_adapter as _random_adapter
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.lora.adapter import LoRAAdapter


def random_adapter(model_config, rank: int, seed: int, modules=("q_proj", "v_proj", "down_proj")) -> LoRAAdapter:
    """A random fp32 adapter whose B is large enough to change greedy outputs."""
    return _random_adapter(model_config, rank, tuple(modules), seed, dtype=torch.float32, b_std=0.05)


SMALL = dict(max_loras=2, max_lora_rank=8, num_kv_blocks=24, kv_block_size=8, max_num_seqs=8, max_model_len=512)


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def engine(default_model_dir, request):
    e = Engine.from_dir(default_model_dir, Settings(async_scheduling=request.param, **SMALL))
    assert e.async_scheduling == (request.param == "on")
    for i in range(3):
        e.add_adapter(f"tenant-{i}", random_adapter(e.model.config, rank=4 + 2 * i, seed=i))
    return e


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_max_tokens_ends_with_length(engine):
    (r,) = engine.generate([GenerationRequest("Count to one hundred:", greedy(5, ignore_eos=True))])
    assert len(r.token_ids) == 5 and r.finish_reason == "length"


def test_stop_string_truncates_the_text(engine):
    request = GenerationRequest("Write a short poem about rivers.", greedy(24, ignore_eos=True), chat=True)
    (full,) = engine.generate([request])
    stop = full.text.strip().split()[3]  # a word from the middle of the answer
    (stopped,) = engine.generate([GenerationRequest(request.prompt, greedy(24, stop=(stop,)), chat=True)])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert len(stopped.token_ids) < len(full.token_ids)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    sampled = GenerationRequest("Tell me about cats.", SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234), chat=True)
    (a,) = engine.generate([sampled])
    (b,) = engine.generate([sampled])
    together = engine.generate([GenerationRequest("Hello", greedy(6)), sampled, GenerationRequest("Dogs are", greedy(9), adapter="tenant-1")])
    other = GenerationRequest("Tell me about cats.", SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99), chat=True)
    (c,) = engine.generate([other])
    assert a.token_ids == b.token_ids == together[1].token_ids
    assert c.token_ids != a.token_ids


def test_more_adapters_than_slots_and_preemption_give_the_same_tokens(engine):
    """3 adapters over 2 slots, and a KV cache too small for everyone at once (24 blocks of
    8 tokens): requests wait or are preempted, and still produce what they produce alone."""
    prompts = ["The history of Rome", "My favourite recipe is", "In the year 2050,", "Quantum physics says", "The ocean"]
    requests = [
        GenerationRequest(p, greedy(56, ignore_eos=True), adapter=[None, "tenant-0", "tenant-1", "tenant-2"][i % 4])
        for i, p in enumerate(prompts)
    ]
    preemptions = engine.num_preemptions
    together = engine.generate(requests)
    assert engine.num_preemptions > preemptions
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back
    assert len({tuple(r.token_ids[:10]) for r in alone[1:4]}) == 3  # the adapters differ


def test_unknown_adapter_and_oversized_prompt_are_refused(engine):
    with pytest.raises(KeyError, match="nobody"):
        engine.generate([GenerationRequest("hi", greedy(2), adapter="nobody")])
    with pytest.raises(ValueError, match="context"):
        engine.generate([GenerationRequest(list(range(1, 600)), greedy(2))])
    assert not engine.has_work()


def test_async_step_returns_the_previous_steps_tokens(engine):
    """The pipelining itself: with asynchronous scheduling a step launches the next forward
    before the previous one's token reaches the host, and the decode reads that token on the
    device; the tokens are still those of the synchronous engine."""
    request = GenerationRequest("Once upon a time", greedy(4, ignore_eos=True))
    (expected,) = engine.generate([request])
    seq = engine.add_request(request)
    first = engine.step()  # the prefill
    if not engine.async_scheduling:
        assert first == [seq] and len(seq.output_ids) == 1 and seq.num_pending == 0
        return
    assert first == [] and seq.output_ids == [] and seq.num_pending == 1
    assert engine.step() == [seq]  # launched the first decode (its input on the device), then read the prefill's token
    assert len(seq.output_ids) == 1 and seq.num_pending == 1 and seq.num_cached_tokens == seq.num_tokens - 1
    while not seq.is_finished:
        engine.step()
    assert seq.output_ids == expected.token_ids and seq.finish_reason == "length"
    assert not engine.has_work() and engine.blocks.num_free == engine.blocks.num_blocks


def test_stops_and_aborts_with_a_token_in_flight_drop_it(engine):
    """A sequence that stops (EOS or a stop string) or is aborted while its next token is
    already computing ends exactly as without asynchronous scheduling, its blocks all back."""
    chat = GenerationRequest("Say hello.", greedy(40), chat=True)
    (eos,) = engine.generate([chat])
    assert eos.finish_reason == "stop" and len(eos.token_ids) < 40  # ended by EOS
    long = GenerationRequest("The history of Rome", greedy(30, ignore_eos=True))
    (full,) = engine.generate([long])
    seq, other = engine.add_request(long), engine.add_request(chat)
    for _ in range(5):
        engine.step()
    engine.abort(seq)
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "abort" and seq.output_ids == full.token_ids[: len(seq.output_ids)]
    assert other.output_ids == eos.token_ids and other.finish_reason == "stop"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_small_adapters_share_the_pages_of_one_large_one(default_model_dir):
    """A pool sized for one adapter of rank 32 (two pages of 16) holds two of rank <= 16 at once:
    they run in the same batch, and each gives what it gives alone."""
    e = Engine.from_dir(default_model_dir, Settings(max_loras=1, max_lora_rank=32, num_kv_blocks=64, kv_block_size=8,
                                                    max_num_seqs=4, max_model_len=256))
    assert (e.pool.num_pages, e.limits.lora_pages) == (2, 2)
    for i, rank in enumerate((16, 8)):
        e.add_adapter(f"small-{i}", random_adapter(e.model.config, rank=rank, seed=20 + i))
    requests = [GenerationRequest("The weather today", greedy(8, ignore_eos=True), adapter=f"small-{i}") for i in range(2)]
    alone = [e.generate([r])[0].token_ids for r in requests]
    seqs = [e.add_request(r) for r in requests]
    e.step()
    assert sorted(s.lora_slot for s in seqs) == [0, 1]  # both resident, side by side
    while e.has_work():
        e.step()
    assert [s.output_ids for s in seqs] == alone and alone[0] != alone[1]
