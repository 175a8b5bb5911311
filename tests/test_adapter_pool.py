"""The device pool's slot contents, checked against the adapter's own tensors."""

import pytest
import torch

from kernels.metadata import LoRABatchMeta
from server.lora.pool import PROJECTION_SLICES, AdapterPool
from server.model.config import ModelConfig
from server.model.llama import LlamaModel
from tests.test_engine import random_adapter
from tests.tiny_models import TINY_CONFIGS


def _model():
    cfg = ModelConfig.from_hf_dict({**TINY_CONFIGS["llama-gqa"]().to_dict(), "architectures": ["LlamaForCausalLM"]})
    with torch.device("meta"):
        model = LlamaModel(cfg)
    return model.to_empty(device="cpu")


def test_slot_holds_exactly_the_adapter_and_reloading_leaves_no_trace():
    """What readers see of a slot (its rows up to its rank per slice, its scales) is the adapter's,
    also after a wider adapter had the slot; the other slots stay empty (rank 0)."""
    model = _model()
    pool = AdapterPool(model, max_adapters=3, max_rank=8)
    wide = random_adapter(model.config, rank=8, seed=1, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    narrow = random_adapter(model.config, rank=2, seed=2, modules=("v_proj",)).packed()
    pool.load(1, wide)
    pool.load(1, narrow)  # same slot: nothing of `wide` may be read
    for layer, name, proj in model.projections():
        for i, module in enumerate(PROJECTION_SLICES[name]):
            a, b = proj.lora.lora_a[i][1], proj.lora.lora_b[i][1]
            weights = narrow.modules.get((layer, module))
            assert proj.lora.slot_ranks[0, i] == 0 and proj.lora.slot_ranks[2, i] == 0  # other slots untouched
            if weights is None:
                assert proj.lora.slot_ranks[1, i] == 0
                continue
            torch.testing.assert_close(a[:2], weights.lora_a, rtol=0, atol=0)
            torch.testing.assert_close(b[:, :2], weights.lora_b, rtol=0, atol=0)
            assert proj.lora.scales[1, i] == weights.scale and proj.lora.slot_ranks[1, i] == 2


def test_pages_hold_four_small_adapters_where_one_large_one_fits():
    """max_rank 64 in pages of 16: a pool sized for 2 adapters of rank 64 holds 8 of rank <= 16
    side by side; each slot's view starts at its own page, so neighbours never mix, and a rank-64
    adapter spans four pages from its slot."""
    model = _model()
    pool = AdapterPool(model, max_adapters=2, max_rank=64)
    assert (pool.page_rank, pool.max_block, pool.num_pages) == (16, 4, 8)
    small = [random_adapter(model.config, rank=r, seed=10 + i, modules=ALL) for i, r in enumerate([16, 8, 16, 4] * 2)]
    for page, adapter in enumerate(small):
        pool.load(page, adapter)
    large = random_adapter(model.config, rank=64, seed=30, modules=ALL)
    for layer, name, proj in model.projections():
        for i, module in enumerate(PROJECTION_SLICES[name]):
            for page, adapter in enumerate(small):
                w = adapter.modules[(layer, module)]
                r = w.lora_a.shape[0]
                assert proj.lora.slot_ranks[page, i] == r
                torch.testing.assert_close(proj.lora.lora_a[i][page, :r], w.lora_a, rtol=0, atol=0)
                torch.testing.assert_close(proj.lora.lora_b[i][page, :, :r], w.lora_b, rtol=0, atol=0)
    pool.load(4, large)  # pages 4..7
    with pytest.raises(IndexError):
        pool.load(6, large)  # would run past the last page
    for layer, name, proj in model.projections():
        for i, module in enumerate(PROJECTION_SLICES[name]):
            w = large.modules[(layer, module)]
            torch.testing.assert_close(proj.lora.lora_a[i][4], w.lora_a, rtol=0, atol=0)
            torch.testing.assert_close(proj.lora.lora_b[i][4], w.lora_b, rtol=0, atol=0)
            assert proj.lora.slot_ranks[0, i] == 16  # the first pages' tenants are still there
    assert pool.pages_for(large) == 4 and pool.pages_for(small[1]) == 1


def test_packed_adapter_is_one_buffer_with_identical_values():
    model = _model()
    adapter = random_adapter(model.config, rank=4, seed=3)
    packed = adapter.packed()
    assert packed.buffer is not None and packed.buffer.numel() * packed.buffer.element_size() == adapter.nbytes
    for key, m in adapter.modules.items():
        assert packed.modules[key].lora_a.data_ptr() >= packed.buffer.data_ptr()
        torch.testing.assert_close(packed.modules[key].lora_a, m.lora_a, rtol=0, atol=0)
        torch.testing.assert_close(packed.modules[key].lora_b, m.lora_b, rtol=0, atol=0)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model_pair(seed: int = 0):
    """Two models with the same random base weights, each to carry its own pool."""
    cfg = ModelConfig.from_hf_dict({**TINY_CONFIGS["llama-gqa"]().to_dict(), "architectures": ["LlamaForCausalLM"]})
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    twin = LlamaModel(cfg)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _mixed_ranks(config, seed: int):
    """q,k,v,o at rank 6 and down_proj at rank 3 in layer 0 only: groups with runs of different ranks."""
    a = random_adapter(config, rank=6, seed=seed, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    b = random_adapter(config, rank=3, seed=seed + 1, modules=("down_proj",))
    modules = {**a.modules, **{k: m for k, m in b.modules.items() if k[0] == 0}}
    return type(a)(rank=6, alpha=a.alpha, use_rslora=False, target_modules=a.target_modules + ("down_proj",),
                   modules=modules)


def _slot_state(model, slot: int) -> list[torch.Tensor]:
    """What readers see of a slot: per slice its rank, scale, and A and B up to that rank."""
    out = []
    for _, _, proj in model.projections():
        for i, (a, b) in enumerate(zip(proj.lora.lora_a, proj.lora.lora_b)):
            r = int(proj.lora.slot_ranks[slot, i])
            out += [proj.lora.slot_ranks[slot, i], proj.lora.scales[slot, i], a[slot, :r], b[slot, :, :r]]
    return out


@pytest.mark.parametrize("history", [
    ("wide",),  # rank 8 on all seven, then rank 2 on v_proj alone: stale rows past the ranks
    ("narrow",),  # the same adapter again
    ("mixed", "wide"),
    ("wide", "failed"),  # a load that failed half-way leaves rank 0, then the newcomer loads
    ("wide", "cleared"),
])
def test_reused_slot_equals_a_fresh_pool_and_the_reference(history, monkeypatch):
    reused_model, fresh_model = _model_pair()
    cfg = reused_model.config
    reused = AdapterPool(reused_model, max_adapters=3, max_rank=8)
    fresh = AdapterPool(fresh_model, max_adapters=3, max_rank=8)
    tenants = {"wide": random_adapter(cfg, rank=8, seed=1, modules=ALL),
               "narrow": random_adapter(cfg, rank=2, seed=5, modules=("v_proj",)),
               "mixed": _mixed_ranks(cfg, seed=3)}
    neighbour = random_adapter(cfg, rank=4, seed=9, modules=ALL)
    reused.load(2, neighbour)
    fresh.load(2, neighbour)
    for step in history:
        if step == "failed":
            with pytest.raises(RuntimeError, match="simulated"):
                _failing_load(reused, tenants["mixed"], monkeypatch)
            assert all(not proj.lora.slot_ranks[1].any() for _, _, proj in reused_model.projections())
        elif step == "cleared":
            reused.clear(1)
        else:
            reused.load(1, tenants[step])
    newcomer = tenants["narrow"]
    reused.load(1, newcomer)
    fresh.load(1, newcomer)

    for a, b in zip(_slot_state(reused_model, 1) + _slot_state(reused_model, 2),
                    _slot_state(fresh_model, 1) + _slot_state(fresh_model, 2)):
        assert torch.equal(a, b)
    # and the same outputs, equal to an fp64 oracle from the adapters' own tensors
    meta = LoRABatchMeta.build([1, 1, 2, -1, 1])
    for (layer, name, proj), (_, _, twin) in zip(reused_model.projections(), fresh_model.projections()):
        xin = torch.randn(5, proj.weight.shape[1])
        y = proj(xin, meta)
        assert torch.equal(y, twin(xin, meta))
        expected = xin.double() @ proj.weight.double().t()
        for t, slot in enumerate([1, 1, 2, -1, 1]):
            adapter = {1: newcomer, 2: neighbour}.get(slot)
            deltas = []
            for module, width in zip(PROJECTION_SLICES[name], proj.out_sizes):
                w = adapter.modules.get((layer, module)) if adapter else None
                deltas.append(torch.zeros(width, dtype=torch.float64) if w is None else
                              w.scale * (xin[t].double() @ w.lora_a.double().t()) @ w.lora_b.double().t())
            expected[t] += torch.cat(deltas)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def _failing_load(pool, adapter, monkeypatch):
    """A load whose row copies fail after the slot's old rows were (partly) overwritten."""
    real, calls = torch.Tensor.index_copy_, []

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure mid-load")
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "index_copy_", flaky)
        pool.load(1, adapter)


def test_a_plan_is_made_once_per_adapter_and_pool():
    """Later loads reuse it; it addresses the adapter's own rows, not the slot's max_rank."""
    model = _model()
    pool = AdapterPool(model, max_adapters=2, max_rank=8)
    adapter = random_adapter(model.config, rank=4, seed=2, modules=ALL).packed()
    plan = pool.plan(adapter)
    pool.load(0, adapter)
    pool.load(1, adapter)
    assert pool.plan(adapter) is plan and len(adapter.plans) == 1
    assert plan.rows.numel() == 2 * 4 * len(adapter.modules)  # rank rows of A and of B^T per module


def test_the_pool_knows_which_projections_each_slot_targets():
    model = _model()
    pool = AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load(0, random_adapter(model.config, rank=4, seed=1, modules=("q_proj", "v_proj")))
    pool.load(1, random_adapter(model.config, rank=4, seed=2, modules=("o_proj", "down_proj")))
    assert pool.projections_of({0}) == {"qkv_proj"}
    assert pool.projections_of({0, 1}) == {"qkv_proj", "o_proj", "down_proj"}
    assert pool.projections_of({2}) == frozenset()
    pool.clear(1)
    assert pool.projections_of({0, 1}) == {"qkv_proj"}


def test_a_pool_of_attention_modules_only_holds_attention_rows_and_refuses_mlp_adapters():
    """LORAPLEX_LORA_MODULES=attention: the MLP projections carry no LoRA and the pool weighs what
    their rows would have added less; a q,k,v,o adapter's slot holds its tensors exactly; an
    adapter on the MLP is refused with the setting's name."""
    model = _model()
    attention = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
    full = AdapterPool(_model(), max_adapters=4, max_rank=8)
    pool = AdapterPool(model, max_adapters=4, max_rank=8, modules=attention)
    assert {name for _, name, proj in model.projections() if proj.lora is not None} == {"qkv_proj", "o_proj"}
    c = model.config

    def row_elements(names):  # A's and B's elements per rank row, over the layers' projections of `names`
        return sum(proj.in_features * len(proj.out_sizes) + sum(proj.out_sizes)
                   for _, name, proj in model.projections() if name in names)

    def pool_rows(p):
        return sum(g.numel() for g in p._groups.values())

    attention_part = row_elements({"qkv_proj", "o_proj"}) / row_elements(set(PROJECTION_SLICES))
    assert pool_rows(pool) == pytest.approx(pool_rows(full) * attention_part, rel=1e-9)
    assert pool.nbytes < full.nbytes
    adapter = random_adapter(c, rank=8, seed=3, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    pool.load(2, adapter)
    for (layer, module), weights in adapter.modules.items():
        name = next(n for n, ms in PROJECTION_SLICES.items() if module in ms)
        proj = dict(((l, n), p) for l, n, p in model.projections())[(layer, name)]
        i = PROJECTION_SLICES[name].index(module)
        torch.testing.assert_close(proj.lora.lora_a[i][2, :8], weights.lora_a, rtol=0, atol=0)
        torch.testing.assert_close(proj.lora.lora_b[i][2, :, :8], weights.lora_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LORAPLEX_LORA_MODULES"):
        pool.load(0, random_adapter(c, rank=4, seed=4, modules=("q_proj", "down_proj")))
