"""The GPU fast path against the eager path and the CPU: decode graphs, paged attention in the
model, device sampling. Run on the H200: `python3 -m pytest -m gpu tests/test_engine_gpu.py`."""

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
from server.engine.sampler import sample  # noqa: E402
from server.model.kv_cache import KVCache  # noqa: E402
from server.model.runner import ModelRunner, SequenceChunk  # noqa: E402

SMALL = dict(
    architectures=["LlamaForCausalLM"], vocab_size=1000, hidden_size=512, intermediate_size=1024,
    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
    max_position_embeddings=2048, rope_theta=10000.0,
)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _engine(dtype, enforce_eager: bool, num_adapters: int, async_scheduling: str = "off",
            modules: tuple[str, ...] = QKVO + ("down_proj",), dora: tuple[int, ...] = ()) -> Engine:
    """`dora`: the indices of the adapters that are DoRA adapters."""
    model = random_model(SMALL, dtype, "cuda", seed=1)
    settings = Settings(device="cuda", max_loras=8, max_lora_rank=16, max_num_seqs=16, num_kv_blocks=256,
                        max_model_len=512, enforce_eager=enforce_eager, async_scheduling=async_scheduling)
    engine = Engine(model, StubTokenizer(), settings)
    for i in range(num_adapters):
        rank = (8, 16)[i % 2]
        engine.add_adapter(f"a{i}", random_adapter(model.config, rank, modules, seed=10 + i,
                                                   device="cuda", dtype=dtype, b_std=0.05, dora=i in dora))
    return engine


def _requests(adapters: list[str | None]) -> list[GenerationRequest]:
    """Greedy requests of 12 tokens, but for the second: seeded sampling, 9 tokens."""
    gen = torch.Generator().manual_seed(5)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * len(adapters)
    params[1] = SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    return [GenerationRequest(torch.randint(1, 1000, (int(n),), generator=gen).tolist(), p, adapter=a)
            for n, a, p in zip(torch.randint(3, 40, (len(adapters),), generator=gen), adapters, params)]


@pytest.mark.parametrize("adapters", [
    ["a0", "a1", "a2", "a3", "a4", None],  # 6 sequences: padded to the 8-graph, base rows among them
    [None] * 3,  # the graph without LoRA kernels
    ["a0", "a0", "a1", None, "a5", "a5", "a2", "a3", "a4"],  # shared adapters, 9 -> the 16-graph
])
def test_graph_replay_gives_the_eager_tokens(adapters):
    """fp32, so that the only difference between the engines is graphs vs eager launches, and
    asynchronous scheduling (decode inputs read from the previous step's sampled ids on the
    device) vs synchronous."""
    eager = _engine(torch.float32, enforce_eager=True, num_adapters=6)
    graphs = _engine(torch.float32, enforce_eager=False, num_adapters=6)
    pipelined = _engine(torch.float32, enforce_eager=False, num_adapters=6, async_scheduling="on")
    assert graphs.runner.graphs is not None and eager.runner.graphs is None and pipelined.async_scheduling
    expected = [r.token_ids for r in eager.generate(_requests(adapters))]
    assert [len(t) for t in expected[:2]] == [12, 9]
    got = [r.token_ids for r in graphs.generate(_requests(adapters))]
    assert got == expected
    assert [r.token_ids for r in pipelined.generate(_requests(adapters))] == expected


def test_attention_only_adapters_replay_the_graphs_without_mlp_lora():
    """Adapters of q/k/v/o only: their batches replay the graphs that skip the MLP's LoRA
    kernels, and give the eager tokens."""
    eager = _engine(torch.float32, enforce_eager=True, num_adapters=4, modules=QKVO)
    graphs = _engine(torch.float32, enforce_eager=False, num_adapters=4, async_scheduling="on", modules=QKVO)
    adapters = ["a0", "a1", None, "a2", "a3", "a1"]
    replayed = []
    real_replay = graphs.runner.graphs.replay
    graphs.runner.graphs.replay = lambda kind, size, lora: replayed.append(lora) or real_replay(kind, size, lora)
    assert [r.token_ids for r in graphs.generate(_requests(adapters))] == \
        [r.token_ids for r in eager.generate(_requests(adapters))]
    assert "attention" in replayed and "all" not in replayed
    resident = {graphs.adapters.slots.slot_of(f"a{i}") for i in range(4)}  # slots are filled on first use
    assert graphs.pool.projections_of(resident) == {"qkv_proj", "o_proj"}


def test_dora_batches_replay_the_dora_graphs_and_give_the_eager_tokens():
    """DoRA adapters beside LoRA ones and the base model: batches holding a DoRA adapter replay
    the graphs with DoRA's scaling, the others skip it, and the tokens are the eager ones."""
    eager = _engine(torch.float32, enforce_eager=True, num_adapters=4, modules=QKVO, dora=(1, 2))
    graphs = _engine(torch.float32, enforce_eager=False, num_adapters=4, async_scheduling="on", modules=QKVO,
                     dora=(1, 2))
    replayed = []
    real_replay = graphs.runner.graphs.replay
    graphs.runner.graphs.replay = lambda kind, size, lora: replayed.append(lora) or real_replay(kind, size, lora)
    for adapters in (["a0", "a1", None, "a2", "a3", "a1"], ["a0", "a3", None]):
        replayed.clear()
        assert [r.token_ids for r in graphs.generate(_requests(adapters))] == \
            [r.token_ids for r in eager.generate(_requests(adapters))]
        dora_replays = {v for v in replayed if v in ("dora", "attention_dora")}
        # q/k/v/o DoRA adapters: the DoRA graph that also skips the MLP's LoRA kernels
        assert dora_replays == ({"attention_dora"} if "a1" in adapters else set())
    assert "attention" in replayed  # the LoRA-only batch skipped DoRA's launch


def test_runner_on_cuda_matches_the_cpu_through_prefill_and_decode():
    """Paged attention and KV writes on the GPU (Triton) against the CPU path; every step here
    replays a graph (the prefill steps a mixed one)."""
    cpu_model = random_model(SMALL, torch.float32, "cpu", seed=2)
    gpu_model = random_model(SMALL, torch.float32, "cpu", seed=2).to("cuda")
    c = cpu_model.config
    runners = [ModelRunner(m, KVCache(c.num_layers, 64, 16, c.num_kv_heads, c.head_dim, torch.float32, dev), dev,
                           max_num_seqs=8, max_model_len=512) for m, dev in ((cpu_model, "cpu"), (gpu_model, "cuda"))]
    runners[1].capture_graphs(8)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in (17, 1, 33, 16, 5)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    # the first prompt arrives in two chunks, beside the others' whole prompts
    steps = [[SequenceChunk(prompts[0][:9], 0, tables[0])],
             [SequenceChunk(prompts[0][9:], 9, tables[0])] + [SequenceChunk(p, 0, t) for p, t in zip(prompts[1:], tables[1:])]]
    lengths = [len(p) for p in prompts]
    for step in range(6):  # decode steps: graphs on the GPU
        steps.append([SequenceChunk([100 + step + i], lengths[i] + step, tables[i]) for i in range(len(prompts))])
    for chunks in steps:
        cpu, gpu = (r.run(chunks) for r in runners)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3 * cpu.abs().max().item(), rtol=0)


def test_device_sampling_reproduces_the_cpu_sampler():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 32000, generator=gen) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9),
              SamplingParams(temperature=1.2, top_k=50), SamplingParams(temperature=0.8, top_k=40, top_p=0.8)] * 13
    params = params[:64]
    seeds = torch.randint(-2**62, 2**62, (64,), generator=gen).tolist()
    steps = torch.randint(0, 4000, (64,), generator=gen).tolist()
    on_cpu = sample(logits, params, seeds, steps)
    on_gpu = sample(logits.cuda(), params, seeds, steps)
    assert on_gpu.is_cuda
    assert on_gpu.cpu().tolist() == on_cpu.tolist()


def test_default_batch_cap_captures_every_graph_and_serves():
    """At the GPU's default cap (256 sequences, auto) the capture covers every decode and mixed
    shape, with and without adapters (mixed shapes of 128 tokens hold 256 padded sequences),
    and a pipelined batch of adapters gives the eager tokens."""
    model = random_model(SMALL, torch.float32, "cuda", seed=1)
    settings = Settings(device="cuda", max_loras=8, max_lora_rank=16, num_kv_blocks=512, max_model_len=512)
    engine = Engine(model, StubTokenizer(), settings)
    assert engine.limits.max_num_seqs == 256 and engine.async_scheduling
    graphs = engine.runner.graphs
    # five variants per shape: no LoRA, LoRA on the attention projections, LoRA everywhere, and the
    # last two with DoRA's scaling (server/model/cuda_graphs.py)
    shapes = [("decode", b) for b in graphs.decode_sizes] + [("mixed", t) for t in graphs.mixed_sizes]
    assert graphs.decode_sizes[-1] == 256
    assert set(graphs._graphs) == {(kind, size, lora) for kind, size in shapes
                                   for lora in (None, "attention", "all", "attention_dora", "dora")}
    eager = _engine(torch.float32, enforce_eager=True, num_adapters=6)
    for i in range(6):
        rank = (8, 16)[i % 2]
        engine.add_adapter(f"a{i}", random_adapter(model.config, rank, QKVO + ("down_proj",), seed=10 + i,
                                                   device="cuda", dtype=torch.float32, b_std=0.05))
    adapters = ["a0", "a1", None, "a2", "a3", "a4", "a5", None, "a1"]
    assert [r.token_ids for r in engine.generate(_requests(adapters))] == \
        [r.token_ids for r in eager.generate(_requests(adapters))]
