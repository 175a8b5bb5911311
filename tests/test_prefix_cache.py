"""Prefix caching: the block allocator's content addressing, reference counts and LRU eviction
(plain Python), the scheduler's use of it with a fake runner, and the engine on the default
model: greedy outputs with the cache equal outputs without it (tenants, adapters on k/v and not,
replacement, preemption), and no tenant ever finds another's blocks."""

import pytest
import torch

from loadtest.random_model import random_adapter as _random_adapter
from server.config import Settings
from server.engine.block_manager import BlockAllocator, block_hash
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from tests.test_scheduler import drain, fake_step, make_scheduler, make_seq


# --- the allocator

def _hashes(tokens, size, namespace=None):
    out = []
    for i in range(len(tokens) // size):
        out.append(block_hash(out[-1] if out else None, namespace, tokens[i * size:(i + 1) * size]))
    return out


def test_a_block_hash_stands_for_its_whole_prefix_and_namespace():
    a, b = _hashes([1, 2, 3, 4, 5, 6], 3), _hashes([9, 2, 3, 4, 5, 6], 3)
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert _hashes([1, 2, 3], 3, ("acme", 1)) != _hashes([1, 2, 3], 3, ("acme", 2)) != _hashes([1, 2, 3], 3)
    assert _hashes([1, 2, 3], 3, "1") != _hashes([1, 2, 3], 3, 1)


def test_shared_blocks_are_counted_and_unreferenced_ones_evicted_least_recent_first():
    blocks = BlockAllocator(4, 2)
    h = _hashes([1, 2, 3, 4, 5, 6], 2)
    first = blocks.allocate(3)
    for block, key in zip(first, h):
        blocks.cache(block, key)
    assert blocks.match_prefix(h) == first and blocks.match_prefix(_hashes([1, 2, 7, 7], 2)) == first[:1]
    shared = blocks.take(blocks.match_prefix(h[:2]))  # a second holder of the first two
    blocks.free(first)
    assert blocks.num_free == 2  # the third block (unreferenced, still cached) and the never-used one
    assert blocks.match_prefix(h) == first  # still findable
    assert blocks.num_unreferenced(first) == 1
    other = blocks.allocate(1)  # a block holding nothing known goes first
    assert other[0] not in first and blocks.match_prefix(h) == first
    evicted = blocks.allocate(1)  # then the cached, unreferenced one is evicted
    assert evicted == first[2:] and blocks.match_prefix(h) == first[:2]
    blocks.free(shared)
    blocks.free(other + evicted)
    assert blocks.num_free == blocks.num_blocks


def test_a_sequence_frees_its_tail_first():
    blocks = BlockAllocator(3, 1)
    held = blocks.allocate(3)
    for block, key in zip(held, _hashes([1, 2, 3], 1)):
        blocks.cache(block, key)
    blocks.free(held)
    assert blocks.allocate(1) == [held[2]]  # the end of the prompt goes before its beginning


def test_without_prefix_caching_nothing_is_found():
    blocks = BlockAllocator(4, 2, prefix_caching=False)
    (block,) = blocks.allocate(1)
    blocks.cache(block, _hashes([1, 2], 2)[0])
    assert blocks.match_prefix(_hashes([1, 2], 2)) == []


# --- the scheduler (fake runner)

def test_a_later_sequence_feeds_only_what_follows_the_cached_prefix():
    sched, _ = make_scheduler(block_size=4)
    first = make_seq(10, max_tokens=3, seed=1)
    sched.add(first)
    drain(sched)
    same, other_tenant = make_seq(10, max_tokens=3, seed=1), make_seq(10, max_tokens=3, seed=1, tenant="acme")
    exact = make_seq(8, max_tokens=2, seed=1)  # two full blocks: the last token is always computed
    for seq in (same, other_tenant, exact):
        sched.add(seq)
    out = sched.schedule()
    fed = {id(c.seq): (c.seq.num_cached_tokens, c.num_tokens) for c in out.chunks}
    assert fed[id(same)] == (8, 2)
    assert fed[id(other_tenant)] == (0, 10)  # another namespace finds nothing
    assert fed[id(exact)] == (4, 4)
    assert sched.blocks.num_hit_tokens == 12 and sched.blocks.num_queried_tokens == 10 + 10 + 10 + 8
    assert same.block_table[:2] == exact.block_table[:1] + [same.block_table[1]]
    for c in out.chunks:  # finish the step as the runner would
        c.seq.num_cached_tokens += c.num_tokens
        c.seq.output_ids.append(7)
    drain(sched)
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_outputs_and_blocks_with_the_cache_equal_those_without_under_preemption():
    """The fake runner's tokens hash everything before them: shared prefixes, preemption and
    recomputation give the same tokens as a scheduler without the cache."""
    results = []
    for caching in (False, True):
        sched, _ = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=6, budget=32)
        sched.blocks.prefix_caching = caching
        seqs = [make_seq(13 + i % 3, max_tokens=12, seed=i % 2, tenant=[None, "a"][i % 2]) for i in range(8)]
        for s in seqs[:4]:
            sched.add(s)
        for _ in range(3):
            fake_step(sched)
        for s in seqs[4:]:
            sched.add(s)
        drain(sched)
        assert sched.num_preemptions > 0 and sched.blocks.num_free == sched.blocks.num_blocks
        results.append([s.output_ids for s in seqs])
    assert results[0] == results[1]


# --- the engine on the default model

SETTINGS = dict(max_loras=3, max_lora_rank=8, kv_block_size=8, max_num_seqs=8, max_model_len=512)
SYSTEM = ("You are the support assistant of a large online shop. Answer politely, briefly and precisely. "
          "Never invent order numbers, prices or delivery dates; when unsure, say so and offer to escalate.")
QUESTIONS = ["Where is my parcel?", "Can I return shoes?", "Do you ship to Norway?"]


def adapter(engine, modules, seed):
    return _random_adapter(engine.model.config, 4, tuple(modules), seed, dtype=torch.float32, b_std=0.3)


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def engine(default_model_dir, request):
    e = Engine.from_dir(default_model_dir, Settings(async_scheduling=request.param, num_kv_blocks=160, **SETTINGS))
    e.add_adapter("kv", adapter(e, ("k_proj", "v_proj"), 1))
    e.add_adapter("kv-2", adapter(e, ("k_proj", "v_proj"), 2))
    e.add_adapter("q-only", adapter(e, ("q_proj",), 3))  # touches no k/v, yet later layers' k/v change
    return e


def _prompt(engine, question):
    return engine.tokenizer.encode(SYSTEM + "\n\nCustomer: " + question + "\nAssistant:")


def _requests(engine, tenants, n=8):
    return [GenerationRequest(_prompt(engine, q), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                              adapter=t) for t in tenants for q in QUESTIONS]


def _generate(engine, requests, caching: bool, one_by_one: bool = False):
    engine.blocks.prefix_caching = caching
    try:
        if one_by_one:
            return [engine.generate([r])[0].token_ids for r in requests]
        return [r.token_ids for r in engine.generate(requests)]
    finally:
        engine.blocks.prefix_caching = True


def test_greedy_outputs_with_the_cache_equal_outputs_without(engine):
    tenants = [None, "kv", "kv-2", "q-only"]
    requests = _requests(engine, tenants)
    expected = _generate(engine, requests, caching=False)
    assert len({tuple(expected[i * 3]) for i in range(4)}) == 4  # the adapters change the answer
    hits = engine.blocks.num_hit_tokens
    assert _generate(engine, requests, caching=True, one_by_one=True) == expected  # each finds the earlier ones'
    shared = len(_prompt(engine, "x")) // 2  # well inside the system prompt
    assert engine.blocks.num_hit_tokens - hits >= len(requests) * shared - 4 * shared
    assert _generate(engine, requests, caching=True) == expected  # all at once, all cached
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_no_tenant_finds_another_tenants_blocks(engine):
    """The base model's and one adapter's cached blocks are never found by another adapter, whether
    it changes k/v itself or only q (which changes the next layers' k/v)."""
    question = "What is your phone number?"
    for owner, other in ((None, "q-only"), ("kv", "kv-2"), ("kv", None)):
        prompt = engine.tokenizer.encode(f"[{owner}, {other}] ") + _prompt(engine, question)  # cached by nobody
        request = GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        own = GenerationRequest(prompt, request.sampling, adapter=owner)
        theirs = GenerationRequest(prompt, request.sampling, adapter=other)
        expected = _generate(engine, [theirs], caching=False)
        engine.blocks.num_hit_tokens = hits = 0
        engine.generate([own])
        engine.generate([own])
        assert engine.blocks.num_hit_tokens > 0  # the owner's second request does hit
        hits = engine.blocks.num_hit_tokens
        assert [r.token_ids for r in engine.generate([theirs])] == expected
        assert engine.blocks.num_hit_tokens == hits


def test_a_replaced_adapters_blocks_are_not_reused(default_model_dir):
    e = Engine.from_dir(default_model_dir, Settings(num_kv_blocks=96, **SETTINGS))
    e.add_adapter("acme", adapter(e, ("v_proj",), 7))
    (request,) = _requests(e, ["acme"])[:1]
    e.generate([request])
    e.add_adapter("acme", adapter(e, ("v_proj",), 8))  # a new version under the same name
    hits = e.blocks.num_hit_tokens
    (after,) = e.generate([request])
    assert e.blocks.num_hit_tokens == hits
    assert after.token_ids == _generate(e, [request], caching=False)[0]


def test_preemption_with_shared_prefixes_gives_the_tokens_of_no_cache(default_model_dir):
    e = Engine.from_dir(default_model_dir, Settings(num_kv_blocks=36, **{**SETTINGS, "max_model_len": 256}))
    e.add_adapter("kv", adapter(e, ("k_proj", "v_proj"), 1))
    requests = _requests(e, [None, "kv"], n=40)
    expected = _generate(e, requests, caching=False)
    preemptions = e.num_preemptions
    e.generate(requests[:1])  # cache the system prompt
    assert [r.token_ids for r in e.generate(requests)] == expected
    assert e.num_preemptions > preemptions and e.blocks.num_hit_tokens > 0
    assert e.blocks.num_free == e.blocks.num_blocks
