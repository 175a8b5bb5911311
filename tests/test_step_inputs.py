"""The runner's step inputs on the host, and the graph shapes a step is padded to: the logic of
the GPU fast path that needs no GPU (the replays themselves: tests/test_engine_gpu.py)."""

from __future__ import annotations

import random

import pytest
import torch

from server.model.cuda_graphs import decode_batch_sizes, mixed_token_sizes
from server.model.runner import SequenceChunk, StepBuffers

BLOCK = 4


def _buffers(max_tokens=64, max_seqs=8, max_blocks=6) -> StepBuffers:
    return StepBuffers(max_tokens, max_seqs, max_blocks, BLOCK, torch.device("cpu"))


def _random_chunks(rng: random.Random, num_seqs: int) -> list[SequenceChunk]:
    blocks = list(range(40))
    rng.shuffle(blocks)
    chunks = []
    for _ in range(num_seqs):
        start = rng.randrange(0, 12)
        n = rng.choice([1, 1, rng.randrange(1, 9)])
        table = [blocks.pop() for _ in range(-(-(start + n) // BLOCK))]
        chunks.append(SequenceChunk([rng.randrange(1000) for _ in range(n)], start, table, lora_slot=-1))
    return chunks


@pytest.mark.parametrize("seed", range(6))
def test_fill_lays_out_each_sequence_as_the_model_reads_it(seed):
    rng = random.Random(seed)
    chunks = _random_chunks(rng, rng.randrange(1, 7))
    buffers = _buffers()
    starts, lens, _ = buffers.fill(chunks)
    t = 0
    for i, c in enumerate(chunks):
        assert starts[i] == t and lens[i] == c.start_position + len(c.token_ids)
        for j, token in enumerate(c.token_ids):
            pos = c.start_position + j
            assert buffers.device_view("input_ids", t + 1)[t] == token
            assert buffers.device_view("positions", t + 1)[t] == pos
            expected_slot = c.block_table[pos // BLOCK] * BLOCK + pos % BLOCK
            assert buffers.device_view("slot_mapping", t + 1)[t] == expected_slot
            t += 1
        assert buffers.device_view("logits_indices", i + 1)[i] == t - 1
        assert buffers.block_tables(i + 1)[i, : len(c.block_table)].tolist() == c.block_table
    assert starts[-1] == t


def test_padding_adds_tokens_that_write_nothing_and_sequences_that_attend_to_nothing():
    chunks = _random_chunks(random.Random(9), 3)
    num_tokens = sum(len(c.token_ids) for c in chunks)
    buffers = _buffers()
    buffers.fill(_random_chunks(random.Random(10), 8))  # stale contents from a larger step
    buffers.fill(chunks, pad_tokens=num_tokens + 5, pad_seqs=7)
    slots = buffers.device_view("slot_mapping", num_tokens + 5)
    assert (slots[num_tokens:] == -1).all() and (slots[:num_tokens] >= 0).all()
    assert (buffers.device_view("input_ids", num_tokens + 5)[num_tokens:] == 0).all()
    query_starts = buffers.device_view("query_starts", 8)
    assert query_starts[3:].tolist() == [num_tokens] * 5  # padding sequences: no query tokens
    assert buffers.device_view("context_lens", 7)[3:].tolist() == [0] * 4


def test_fill_lists_the_sequences_of_several_tokens():
    chunks = [SequenceChunk([5], 3, [0]), SequenceChunk([1, 2, 3], 0, [1]), SequenceChunk([7], 9, [2, 3, 4]),
              SequenceChunk([4, 4], 6, [5, 6])]
    buffers = _buffers()
    buffers.fill(_random_chunks(random.Random(3), 7))  # stale entries from a step with other prompts
    buffers.fill(chunks)
    assert buffers.device_view("prefill_seqs", 8).tolist() == [1, 3] + [-1] * 6
    meta = buffers.attention_meta(7, 4, 3, None, num_prefill_slots=4)
    assert meta.prefill_seqs.tolist() == [1, 3, -1, -1]
    assert buffers.attention_meta(4, 4, 1, None).prefill_seqs is None


def test_graph_shapes_cover_every_batch_with_the_smallest_padding():
    assert decode_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and decode_batch_sizes(256)[-1] == 256
    assert decode_batch_sizes(5) == [1, 2, 4, 5]
    for max_tokens in (100, 2048, 8192):
        sizes = mixed_token_sizes(max_tokens)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    assert mixed_token_sizes(2048)[:3] == [128, 192, 256]
    for batch in range(1, 257):
        size = next(b for b in decode_batch_sizes(256) if b >= batch)
        assert size - batch < 16


def test_capacity_is_checked():
    buffers = _buffers(max_tokens=8, max_seqs=2, max_blocks=3)
    assert buffers.fits(8, 2, 3) and not buffers.fits(9, 2, 3) and not buffers.fits(8, 3, 3)
    assert not buffers.fits(8, 2, 4)


def test_a_step_is_padded_to_the_smallest_captured_shape_that_holds_it():
    from loadtest.random_model import random_model
    from server.model.cuda_graphs import StepGraphs
    from server.model.kv_cache import KVCache
    from server.model.runner import ModelRunner

    shape = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = random_model(shape, torch.float32, "cpu")
    c = model.config
    runner = ModelRunner(model, KVCache(1, 16, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, "cpu"), "cpu",
                         max_num_seqs=8, max_num_batched_tokens=300, max_model_len=64)
    graphs = StepGraphs(runner, 8)  # shapes only: nothing is captured on the CPU
    assert graphs.shape_for(5, 5) == ("decode", 8) and graphs.shape_for(1, 1) == ("decode", 1)
    assert graphs.shape_for(100, 5) == ("mixed", 128) and graphs.shape_for(193, 8) == ("mixed", 256)
    assert graphs.shape_for(300, 8) == ("mixed", 300)
    assert graphs.shape_for(301, 8) is None and graphs.shape_for(9, 9) is None  # eager
    assert graphs.shape_for(100, 5, num_prefills=16) == ("mixed", 128)
    assert graphs.shape_for(100, 5, num_prefills=17) is None  # more prompts than the prefill launch lists
    assert graphs.padding("mixed", 128) == (128, 8) and graphs.padding("decode", 4) == (4, 4)
    wide = StepGraphs(runner, 8)
    wide.max_seqs = 256  # a mixed shape holds no more sequences than tokens
    assert wide.padding("mixed", 128) == (128, 128) and wide.padding("mixed", 300) == (300, 256)


def test_lora_metadata_refills_only_when_the_slots_change():
    from kernels.metadata import LoRABatchMeta

    meta = LoRABatchMeta.build([0, 1, 1, -1], "cpu", capacity=8)
    first = meta.packed.clone()
    meta.update([0, 1, 1, -1])  # an unchanged decode batch: nothing to write
    assert torch.equal(meta.packed, first) and meta.active_slots == [0, 1]
    meta.update([2, -1])
    assert meta.token_slots.tolist() == [2, -1] and meta.active_slots == [2]
    assert [(s, idx.tolist()) for s, idx in meta.groups()] == [(2, [0])]
    meta.update([0, 1, 1, -1])
    assert torch.equal(meta.packed, first)
    assert [(s, idx.tolist()) for s, idx in meta.groups()] == [(0, [0]), (1, [1, 2])]


@pytest.mark.parametrize("adapters", [None, "attention", "all", "attention_dora", "dora"])
def test_padded_graph_shapes_compute_the_unpadded_logits(adapters):
    """The forward a captured graph replays, run eagerly on the CPU at the padded shapes (decode
    and mixed, without LoRA kernels, with them on the attention projections only for adapters of
    q and v, on every projection for adapters that also target down_proj, and with DoRA's scaling
    for DoRA adapters): the real rows equal the unpadded step's; and skipping the MLP's kernels
    where an adapter targets it, or DoRA's scaling for a DoRA adapter, shows."""
    with_adapters = adapters is not None
    from loadtest.random_model import random_adapter, random_model
    from server.lora.pool import AdapterPool
    from server.model.cuda_graphs import StepGraphs
    from server.model.kv_cache import KVCache
    from server.model.runner import ModelRunner

    shape = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = random_model(shape, torch.float32, "cpu", seed=4)
    for layer in model.layers:  # MLP activations large enough that a down_proj delta shows in the logits
        layer.mlp.gate_up_proj.weight.mul_(20)
    c = model.config
    pool = AdapterPool(model, max_adapters=3, max_rank=8)
    modules = ("q_proj", "v_proj") + (("down_proj",) if adapters in ("all", "dora") else ())
    for slot in range(3):  # with DoRA, slot 1 holds a LoRA adapter beside two DoRA ones
        pool.load(slot, random_adapter(c, 4 + 2 * slot, modules, seed=slot, dtype=torch.float32, b_std=0.2,
                                       dora=adapters in ("dora", "attention_dora") and slot != 1))
    runner = ModelRunner(model, KVCache(c.num_layers, 32, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, "cpu"),
                         "cpu", max_num_seqs=6, max_num_batched_tokens=256, max_model_len=64)
    graphs = StepGraphs(runner, 6)
    rng = random.Random(1)
    tables = [[3 * i, 3 * i + 1, 3 * i + 2, 3 * i + 3 + 12] for i in range(4)]
    slots = [0, 2, -1, 1] if with_adapters else [-1] * 4
    prompts = [[rng.randrange(96) for _ in range(n)] for n in (5, 9, 3, 7)]
    steps = [
        [SequenceChunk(p[:-1], 0, t, s) for p, t, s in zip(prompts[:3], tables, slots)],  # three prompts
        [SequenceChunk(p[-1:], len(p) - 1, t, s) for p, t, s in zip(prompts[:3], tables, slots)]  # three decodes
        + [SequenceChunk(prompts[3], 0, tables[3], slots[3])],  # beside a new prompt: a mixed step
        [SequenceChunk([rng.randrange(96)], len(p), t, s) for p, t, s in zip(prompts[:3], tables, slots)],  # 3 -> 4
    ]
    for chunks in steps:
        expected = runner.run(chunks)  # eager, unpadded (this runner has no graphs captured)
        num_tokens = sum(len(ch.token_ids) for ch in chunks)
        kind, size = graphs.shape_for(num_tokens, len(chunks))
        pad_tokens, pad_seqs = graphs.padding(kind, size)
        assert (pad_tokens, pad_seqs) != (num_tokens, len(chunks))  # padding really happens
        runner.buffers.fill(chunks, pad_tokens=pad_tokens, pad_seqs=pad_seqs)
        token_slots = [ch.lora_slot for ch in chunks for _ in ch.token_ids]
        if any(s >= 0 for s in token_slots):
            runner.lora_meta.update(token_slots + [-1] * (pad_tokens - num_tokens))
        projections = pool.projections_of({s for s in token_slots if s >= 0})
        variant = graphs.lora_variant(projections) if any(s >= 0 for s in token_slots) else None
        assert variant == adapters or (adapters == "all" and variant is None)
        graphs._forward(kind, size, variant)
        torch.testing.assert_close(graphs.logits[: len(chunks)], expected, rtol=1e-5, atol=1e-5)
        if variant in ("all", "dora"):  # the attention-only graph would drop the down_proj deltas
            graphs._forward(kind, size, "attention")
            assert (graphs.logits[: len(chunks)] - expected).abs().max() > 0.01 * expected.abs().max()
        if variant in ("dora", "attention_dora"):  # and the LoRA-only graph DoRA's factors: through q and v
            # alone a small change in the logits, but far beyond fp32's rounding (1e-7)
            graphs._forward(kind, size, "all" if variant == "dora" else "attention")
            assert (graphs.logits[: len(chunks)] - expected).abs().max() > 1e-3 * expected.abs().max()


def test_graph_dummy_inputs_fit_every_captured_shape():
    """The capture's stand-in batches: LoRA slots for exactly the shape's tokens, also where a
    mixed shape holds fewer tokens than sequences (128 tokens, 256 sequences)."""
    from loadtest.random_model import random_model
    from server.lora.pool import AdapterPool
    from server.model.cuda_graphs import StepGraphs
    from server.model.kv_cache import KVCache
    from server.model.runner import ModelRunner

    shape = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = random_model(shape, torch.float32, "cpu")
    AdapterPool(model, max_adapters=5, max_rank=4)
    c = model.config
    runner = ModelRunner(model, KVCache(1, 8, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, "cpu"), "cpu",
                         max_num_seqs=256, max_num_batched_tokens=512, max_model_len=32)
    graphs = StepGraphs(runner, 256)
    for kind, sizes in (("decode", graphs.decode_sizes), ("mixed", graphs.mixed_sizes)):
        for size in sizes:
            graphs._write_dummy_inputs(kind, size, with_lora=True)
            num_tokens, _ = graphs.padding(kind, size)
            assert len(runner.lora_meta.token_slots) == num_tokens
            assert runner.lora_meta.has_lora


@pytest.mark.parametrize("seed", range(4))
def test_pending_tokens_are_read_from_the_previous_steps_sampled_ids(seed):
    """Asynchronous scheduling: a chunk whose last token is still on the device (pending_row)
    gets it from the previous step's sampled ids; the inputs equal those with the ids known."""
    rng = random.Random(seed)
    chunks = _random_chunks(rng, rng.randrange(2, 8))
    sampled = torch.tensor([rng.randrange(1000) for _ in range(8)], dtype=torch.int64)
    pending = []
    for i, c in enumerate(chunks):
        if i == 0 or rng.random() < 0.6:
            row = rng.randrange(8)
            pending.append(SequenceChunk(c.token_ids[:-1] + [0], c.start_position, c.block_table, pending_row=row))
            c.token_ids[-1] = int(sampled[row])
        else:
            pending.append(c)
    known, deferred = _buffers(), _buffers()
    known.fill(chunks)
    _, _, num_pending = deferred.fill(pending)
    assert num_pending == sum(c.pending_row >= 0 for c in pending) > 0
    deferred.take_pending_tokens(num_pending, sampled)
    num_tokens = sum(len(c.token_ids) for c in chunks)
    for name in ("input_ids", "positions", "slot_mapping"):
        assert torch.equal(deferred.device_view(name, num_tokens), known.device_view(name, num_tokens)), name
