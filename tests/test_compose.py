"""Adapter composition (server/lora/compose.py) against peft's `add_weighted_adapter` on a tiny
random model: the composed adapter, served by our runtime, gives peft's logits for `cat` and
`svd` (interpolation, negative weights, sources of different ranks and target modules)."""

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel

from server.lora.compose import Recipe, RecipeError, Source, compose
from server.lora.peft import load_peft_adapter, load_peft_adapter_dir
from server.model.loader import load_model
from server.model.runner import SequenceChunk
from tests.peft_helpers import make_peft_model, save_adapter
from tests.test_lora_forward import _logits, _setup, base  # noqa: F401  (base: the fixture)

# sources: q/v r8; q/k/o/down/up with rank and alpha patterns; all-linear r16 with rsLoRA
SOURCES = {"a": "r8-qv", "b": "patterns", "c": "r16-all-linear-rslora", "d": "dora-r8-qv"}
ATOL = {"cat": 5e-5, "svd": 2e-4}


@pytest.fixture(scope="module")
def sources(base, tmp_path_factory):
    """name -> (adapter directory, our parsed adapter)"""
    hf, path = base
    model_cfg = load_model(path, torch.float32, "cpu").config
    out = {}
    for seed, (name, config) in enumerate(SOURCES.items()):
        directory = save_adapter(make_peft_model(copy.deepcopy(hf), config, seed=40 + seed, b_std=0.1),
                                 tmp_path_factory.mktemp(name))
        out[name] = (directory, load_peft_adapter_dir(directory, model_cfg, max_rank=64))
    return out


def _peft_composed(hf, sources, names, weights, method, rank=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(hf), sources[names[0]][0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(sources[name][0], adapter_name=name)
        model.add_weighted_adapter(list(names), list(weights), "composed", combination_type=method, svd_rank=rank)
        model.set_adapter("composed")
    return model.eval()


def _ours(path, sources, names, weights, method, rank=None):
    config, weights_bytes = compose(Recipe(tuple(Source(n, w) for n, w in zip(names, weights)), method, rank),
                                    [sources[n][1] for n in names], max_rank=64)
    model_cfg = load_model(path, torch.float32, "cpu").config
    adapter = load_peft_adapter(config, weights_bytes, model_cfg, max_rank=64)
    runner, slots = _setup(path, {"composed": (None, adapter)}, max_rank=64)
    return runner, slots["composed"], adapter, json.loads(config)


@pytest.mark.parametrize("names, weights, method, rank", [
    (("a", "b"), (0.7, -0.3), "cat", None),  # task arithmetic with a negation
    (("a", "c"), (0.5, 0.5), "cat", None),  # interpolation; different ranks and targets
    (("b", "a", "c"), (1.0, -0.5, 0.25), "svd", 12),
    (("a", "b"), (0.6, 0.4), "svd", None),  # rank: the largest source rank, as in peft
], ids=["cat-negation", "cat-interpolation", "svd-rank12", "svd-default-rank"])
def test_composition_equals_peft_add_weighted_adapter(base, sources, names, weights, method, rank):
    hf, path = base
    runner, slot, adapter, config = _ours(path, sources, names, weights, method, rank)
    expected_model = _peft_composed(hf, sources, names, weights, method, rank)
    ids = torch.randint(0, 128, (12,)).tolist()
    ours = runner.run([SequenceChunk(ids, 0, [0, 1, 2], lora_slot=slot)], all_logits=True)
    expected = _logits(expected_model, ids)
    torch.testing.assert_close(ours, expected, atol=ATOL[method], rtol=0)
    for name in names:  # the composition is none of its sources
        assert (expected - _logits(_peft_composed(hf, sources, [name], [1.0], "cat"), ids)).abs().max() > 1e-2
    targeted = {key for n in names for key in sources[n][1].modules}
    assert set(adapter.modules) == targeted  # the union of the sources' modules
    if method == "cat":  # exact: each module's rank is the sum of its sources' ranks
        for key, m in adapter.modules.items():
            assert m.rank == sum(sources[n][1].modules[key].rank for n in names if key in sources[n][1].modules)
    else:
        assert adapter.rank == (rank or max(sources[n][1].rank for n in names))
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]


def test_a_single_negated_source_is_the_source_with_its_delta_negated(base, sources, tmp_path):
    """peft cannot negate one adapter (its one-source path takes a square root of the weight):
    the independent reference is the same peft adapter with lora_B negated."""
    hf, path = base
    runner, slot, _, _ = _ours(path, sources, ["c"], [-1.0], "cat")
    negated = PeftModel.from_pretrained(copy.deepcopy(hf), sources["c"][0]).eval()
    with torch.no_grad():
        for name, p in negated.named_parameters():
            if "lora_B" in name:
                p.neg_()
    ids = torch.randint(0, 128, (9,)).tolist()
    ours = runner.run([SequenceChunk(ids, 0, [0, 1, 2], lora_slot=slot)], all_logits=True)
    torch.testing.assert_close(ours, _logits(negated, ids), atol=ATOL["cat"], rtol=0)


@pytest.mark.parametrize("recipe, words", [
    (Recipe((), "cat"), "at least one source"),
    (Recipe((Source("a", float("nan")),), "cat"), "finite"),
    (Recipe((Source("a", float("inf")),), "svd"), "finite"),
    (Recipe((Source("a", True),), "cat"), "finite"),
    (Recipe((Source("a", 1.0),), "linear"), "method"),
    (Recipe((Source("a", 1.0),), "cat", 8), "svd only"),
    (Recipe((Source("a", 1.0),), "svd", 65), "1..64"),
    (Recipe((Source("a", 1.0),), "svd", 0), "1..64"),
    (Recipe((Source("c", 1.0), Source("c", 1.0), Source("c", 1.0), Source("c", 1.0), Source("c", 1.0)), "cat"),
     "over this server's max_lora_rank 64"),
    (Recipe((Source("a", 1.0), Source("d", 1.0)), "cat"), "DoRA"),
])
def test_invalid_recipes_are_refused(sources, recipe, words):
    with pytest.raises(RecipeError, match=words):
        compose(recipe, [sources[s.customer_id][1] for s in recipe.sources], max_rank=64)
