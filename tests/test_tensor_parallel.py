"""Tensor parallelism on the CPU: a TP=2 group (two spawned processes, gloo, fp32) gives the same
logits as our single-process model (TP=1, checked against transformers and peft elsewhere), for
base and mixed-adapter batches (LoRA on q/k/v/o, on all linear layers, DoRA on all linear
layers), over prefills and decodes, with fewer KV heads than ranks (replicated), as many, and more;
one case also through the rank-0 driver (server/engine/tp_driver.py). One spawned group runs
every case (tests/tensor_parallel_cases.py); spawning dominates the time.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from server.lora.peft import load_peft_adapter_dir
from server.lora.sharding import shard_adapter
from server.model import loader
from server.model.loader import load_model
from server.model.tensor_parallel import ShardPlan, TensorParallel, TensorParallelError, free_tcp_address
from tests.peft_helpers import randomize_adapter
from tests.tensor_parallel_cases import MAX_RANK, run_case, worker
from tests.tiny_models import build_tiny

WORLD_SIZE = 2
DRIVEN = ["llama-bias/mixed"]  # also run through server/engine/tp_driver.py (rank 0 loads and runs)
RTOL_OF_SCALE = 1e-5  # |TP=2 - TP=1| <= this times the largest |logit| of the case

ADAPTERS = {
    "qkvo": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-linear": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True,
                       rank_pattern={"down_proj": 12, "k_proj": 4}),
    "dora-all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                            rank_pattern={"o_proj": 8}),
}


def _llama_kv4():
    """8 heads over 4 KV heads: two KV heads per rank."""
    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4, vocab_size=128)).eval()


MODELS = {
    "llama-kv1": lambda: build_tiny("llama-tied", seed=1),  # 1 KV head < 2 ranks, tied embeddings
    "qwen2-kv2": lambda: build_tiny("qwen2-bias", seed=2),  # 2 KV heads = 2 ranks, q/k/v biases
    "llama-kv4": _llama_kv4,
    "llama-bias": lambda: build_tiny("llama-linear-rope-bias", seed=4),  # o and down biases (row-parallel)
}


def _steps(with_adapters: bool) -> list:
    """Prefills of four sequences; their decodes beside a fifth's prefill; every one's decode."""
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return torch.randint(0, 128, (n,), generator=g).tolist()

    lengths, adapters = (7, 5, 9, 6, 4), ((0, 1, -1, 2, 0) if with_adapters else (-1,) * 5)
    tables = torch.randperm(48, generator=g)[:25].view(5, 5).tolist()  # scattered, disjoint blocks
    prompts = [ids(n) for n in lengths]

    def seq(i, tokens, start):
        return [tokens, start, tables[i], adapters[i]]

    return [
        [seq(i, prompts[i], 0) for i in range(4)],
        [seq(i, ids(1), lengths[i]) for i in range(4)] + [seq(4, prompts[4], 0)],
        [seq(i, ids(1), lengths[i] + (i < 4)) for i in range(5)],
    ]


def write_cases(root, models: dict) -> dict:
    """Each model's checkpoint and adapters under `root`; the spec of its base and mixed cases."""
    spec = {}
    for m, (name, build) in enumerate(sorted(models.items())):
        hf = build()
        model_dir = root / name
        hf.save_pretrained(model_dir)
        adapter_dirs = []
        for a, (adapter, kwargs) in enumerate(sorted(ADAPTERS.items())):
            torch.manual_seed(100 * m + a)
            peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**kwargs))
            randomize_adapter(peft_model)
            peft_model.save_pretrained(root / f"{name}-{adapter}")
            adapter_dirs.append(str(root / f"{name}-{adapter}"))
        spec[f"{name}/base"] = dict(model_dir=str(model_dir), adapter_dirs=[], steps=_steps(False))
        spec[f"{name}/mixed"] = dict(model_dir=str(model_dir), adapter_dirs=adapter_dirs, steps=_steps(True))
    return spec


def _llama_wide():
    """Wide enough for NF4 shards: each rank's o and down inputs (64, 128) are whole 64-blocks."""
    torch.manual_seed(5)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        attention_bias=True, mlp_bias=True)).eval()


QUANTIZED = {"llama-wide/nf4": "nf4", "llama-wide/fp8": "fp8"}  # mixed-adapter cases over a quantized base


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    spec = write_cases(root, MODELS)
    mixed = write_cases(root, {"llama-wide": _llama_wide})["llama-wide/mixed"]
    for name, fmt in QUANTIZED.items():
        spec[name] = dict(mixed, quantize=fmt)
    return root, spec


@pytest.fixture(scope="module")
def results(cases):
    """case -> (TP=1 logits, rank 0's TP=2 logits, rank 1's), each a list over steps."""
    root, spec = cases
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps({"cases": spec, "driven": DRIVEN, "out_dir": str(root)}))
    mp.spawn(worker, args=(WORLD_SIZE, free_tcp_address(), str(spec_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    out = {name: (run_case(case), ranks[0][name], ranks[1][name]) for name, case in spec.items()
           if name not in QUANTIZED}
    for name in QUANTIZED:  # TP=1: the dense model whose weights are the ranks' dequantized shards
        case = spec[name]
        reference = load_model(case["model_dir"], torch.float32, "cpu")
        _assemble(reference, [ranks[r][f"weights:{name}"] for r in range(WORLD_SIZE)])
        out[name] = (run_case(case, model=reference), ranks[0][name], ranks[1][name])
        out[f"tp1:{name}"] = (run_case(case), run_case(dict(case, quantize=None)))  # quantized whole; dense
    for name in spec:
        out[f"all_reduces:{name}"] = (ranks[0][f"all_reduces:{name}"], ranks[1][f"all_reduces:{name}"])
    for name in DRIVEN:
        assert ranks[1][f"driven:{name}"] is None  # workers return nothing: rank 0 holds the logits
        out[f"driven:{name}"] = (out[name][0], ranks[0][f"driven:{name}"], ranks[0][f"driven:{name}"])
    return out


def _assemble(model, shards: list[dict]) -> None:
    """Write each rank's (dequantized) rows or columns of every projection into the whole model."""
    from server.lora.pool import PROJECTION_SLICES

    for layer, name, proj in model.projections():
        offset = 0
        for module, size in zip(PROJECTION_SLICES[name], proj.out_sizes):
            whole = proj.weight.data[offset : offset + size]
            for rank, weights in enumerate(shards):
                plan = ShardPlan(model.config, rank, len(shards))
                rows, cols = plan.rows(module), plan.cols(module)
                if rows is not None:
                    whole[rows] = weights[(layer, module)]
                else:
                    whole[:, cols] = weights[(layer, module)]
            offset += size


# FP8 quantizes each token's activations at run time, per rank over its own input columns under
# tensor parallelism: no dense model computes the same (see test_fp8_split_adds_no_more_error...)
ATOL_OF_SCALE = {"llama-wide/fp8": 1.0}


@pytest.mark.parametrize("case", [f"{m}/{kind}" for m in sorted(MODELS) for kind in ("base", "mixed")]
                         + sorted(QUANTIZED) + [f"driven:{name}" for name in DRIVEN])
def test_tp2_logits_equal_tp1(results, case):
    """Quantized cases: each rank quantizes its own shard at load; the reference is the dense
    model of those shards dequantized (NF4: the same products, so the same tight bound)."""
    reference, rank0, rank1 = results[case]
    scale = max(step.abs().max().item() for step in reference)
    for step, (expected, got0, got1) in enumerate(zip(reference, rank0, rank1)):
        assert got0.shape == expected.shape and torch.isfinite(got0).all()
        torch.testing.assert_close(got0, expected, atol=ATOL_OF_SCALE.get(case, RTOL_OF_SCALE) * scale, rtol=0,
                                   msg=lambda m: f"step {step} (scale {scale:.3g}): {m}")
        # every rank ends with the same full logits (replicated head after identical all-reduces)
        assert torch.equal(got0, got1), f"step {step}: the ranks disagree"


def test_adapters_change_the_logits(results):
    """So the mixed cases could fail: each adapter moves its tokens' logits far beyond the tolerance."""
    for m in MODELS:
        base, mixed = results[f"{m}/base"][0], results[f"{m}/mixed"][0]
        first = base[0]  # step 0: sequences 0..3 with adapters 0, 1, none, 2; rows by sequence
        rows = torch.tensor([0, 7, 12, 21, 27])  # their tokens' row offsets (lengths 7, 5, 9, 6)
        scale = first.abs().max().item()
        for seq in (0, 1, 3):
            delta = (mixed[0][rows[seq]:rows[seq + 1]] - first[rows[seq]:rows[seq + 1]]).abs().max().item()
            assert delta > 1e3 * RTOL_OF_SCALE * scale, f"{m}: the adapter of sequence {seq} changes nothing"
        torch.testing.assert_close(mixed[0][rows[2]:rows[3]], first[rows[2]:rows[3]], atol=1e-6, rtol=0)


def test_lora_adds_no_collective(results, cases):
    """Two all-reduces a layer a step (o and down), with adapters on every projection or none:
    a row-parallel LoRA expands its partial shrink before the projection's own all-reduce."""
    _, spec = cases
    for m in MODELS:
        layers = json.loads((Path(spec[f"{m}/base"]["model_dir"]) / "config.json").read_text())["num_hidden_layers"]
        for kind in ("base", "mixed"):
            expected = 2 * layers * len(spec[f"{m}/{kind}"]["steps"])
            assert results[f"all_reduces:{m}/{kind}"] == (expected, expected), (m, kind)


# --- the shard plan and loading shard by shard, in this process (no group needed to load)

def test_shard_plan_heads_and_channels():
    cfg = load_model_config(num_heads=8, num_kv_heads=2, intermediate=96)
    plans = [ShardPlan(cfg, r, 4) for r in range(4)]
    assert [list(p.q_heads) for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(p.kv_heads) for p in plans] == [[0], [0], [1], [1]]  # 2 KV heads replicated over 4 ranks
    assert [p.intermediate for p in plans] == [range(24 * r, 24 * (r + 1)) for r in range(4)]
    assert plans[3].rows("v_proj") == slice(8, 16) and plans[3].cols("o_proj") == slice(48, 64)
    assert plans[1].rows("o_proj") is None and plans[1].cols("q_proj") is None
    local = plans[2].local_config
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.head_dim) == (2, 1, 24, 8)
    with pytest.raises(TensorParallelError, match="attention heads"):
        ShardPlan(cfg, 0, 3)
    with pytest.raises(TensorParallelError, match="KV heads"):
        ShardPlan(load_model_config(num_heads=12, num_kv_heads=3, intermediate=96), 0, 2)


def load_model_config(num_heads, num_kv_heads, intermediate):
    from server.model.config import ModelConfig

    return ModelConfig.from_hf_dict(dict(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1,
                                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                         vocab_size=128))


def test_rank_loads_only_its_rows_and_columns(tmp_path, monkeypatch):
    """Rank 1 of 2: its fused projections are its slices of the whole weights, and no projection
    tensor was read whole (only through safetensors slices)."""
    hf = build_tiny("qwen2-bias", seed=5)
    hf.save_pretrained(tmp_path)
    whole = load_model(tmp_path, torch.float32, "cpu")
    read_whole = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self._file = safe_open(*args, **kwargs)

        def __enter__(self):
            self._f = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            read_whole.append(key)
            return self._f.get_tensor(key)

        def get_slice(self, key):
            return self._f.get_slice(key)

    monkeypatch.setattr(loader, "safe_open", Recording)
    shard = load_model(tmp_path, torch.float32, "cpu", tp=TensorParallel(rank=1, world_size=2))
    assert read_whole and not [k for k in read_whole if "_proj." in k]  # qwen2: no o/down bias to read whole
    cfg, hd = whole.config, whole.config.head_dim  # 4 heads, 2 KV heads: rank 1 has q heads 2-3, KV head 1
    w, s = whole.layers[1].self_attn.qkv_proj, shard.layers[1].self_attn.qkv_proj
    q, kv = cfg.q_size, cfg.kv_size
    for whole_rows, shard_rows in ((slice(2 * hd, 4 * hd), slice(0, 2 * hd)),
                                   (slice(q + hd, q + 2 * hd), slice(2 * hd, 3 * hd)),
                                   (slice(q + kv + hd, q + kv + 2 * hd), slice(3 * hd, 4 * hd))):
        assert torch.equal(s.weight[shard_rows], w.weight[whole_rows])
        assert torch.equal(s.bias[shard_rows], w.bias[whole_rows])
    assert torch.equal(shard.layers[0].self_attn.o_proj.weight, whole.layers[0].self_attn.o_proj.weight[:, 2 * hd:])
    i = cfg.intermediate_size // 2
    gu, sgu = whole.layers[0].mlp.gate_up_proj.weight, shard.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(sgu, torch.cat([gu[i : 2 * i], gu[3 * i :]]))
    assert torch.equal(shard.layers[0].mlp.down_proj.weight, whole.layers[0].mlp.down_proj.weight[:, i:])
    assert torch.equal(shard.embed_tokens.weight, whole.embed_tokens.weight)  # replicated


def test_adapter_shard_follows_the_base_split(tmp_path):
    hf = build_tiny("llama-gqa", seed=6)  # 4 heads, 2 KV heads, intermediate 96
    hf.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(hf, LoraConfig(**ADAPTERS["dora-all-linear"]))
    randomize_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = load_model(tmp_path / "base", torch.float32, "cpu").config
    adapter = load_peft_adapter_dir(tmp_path / "adapter", cfg, max_rank=MAX_RANK)
    plan = ShardPlan(cfg, 0, 2)
    shard = shard_adapter(adapter, plan)
    for (layer, module), m in adapter.modules.items():
        s = shard.modules[(layer, module)]
        if module in ("o_proj", "down_proj"):
            assert torch.equal(s.lora_a, m.lora_a[:, plan.cols(module)]) and torch.equal(s.lora_b, m.lora_b)
            assert torch.equal(s.magnitude, m.magnitude)
        else:
            assert torch.equal(s.lora_a, m.lora_a) and torch.equal(s.lora_b, m.lora_b[plan.rows(module)])
            assert torch.equal(s.magnitude, m.magnitude[plan.rows(module)])
        assert s.scale == m.scale


def test_fp8_split_adds_no_more_error_than_fp8_itself(results):
    """TP=2 FP8 (each rank's own weight and activation scales) is about as far from TP=1 FP8 as
    TP=1 FP8 is from the dense model: the split changes rounding, not the computation."""
    name = "llama-wide/fp8"
    whole, dense = results[f"tp1:{name}"]
    split = results[name][1]
    for step, (w, d, s) in enumerate(zip(whole, dense, split)):
        fp8_error = (w - d).abs().max().item()
        assert 0 < fp8_error < 0.2 * d.abs().max().item()
        assert (s - w).abs().max().item() <= 1.5 * fp8_error, f"step {step}"
        assert (s - d).abs().max().item() <= 1.5 * fp8_error, f"step {step}"
