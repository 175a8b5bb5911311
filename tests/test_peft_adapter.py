"""The PEFT adapter parser against peft itself.

Good adapters are made by peft (get_peft_model + save_pretrained on a tiny random Llama, with
random non-zero lora_B) and must come back with peft's own tensors and scales. Bad adapters are
a good one with its JSON or safetensors edited, and must be refused naming the field or tensor.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from server.lora.peft import (  # noqa: E402
    AdapterValidationError,
    load_peft_adapter,
    load_peft_adapter_dir,
    parse_adapter_config,
)
from server.model.config import LORA_TARGET_MODULES, ModelConfig  # noqa: E402

MAX_RANK = 64
SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128,
)
LLAMA = LlamaConfig(**SHAPE)
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.from_hf_dict(LLAMA.to_dict())


def fresh_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LLAMA)


def peft_modules(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Full module name -> (A, B, scale) for every LoRA layer peft holds, as peft holds it."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix(PREFIX)] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                module.scaling["default"],
            )
    return out


def save_peft_adapter(directory: Path, **lora_kwargs) -> dict:
    """Build a peft LoRA with random non-zero B, save it, return peft's view of its modules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh_base(), LoraConfig(**lora_kwargs))
        torch.manual_seed(1)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                with torch.no_grad():
                    module.lora_B["default"].weight.copy_(torch.randn_like(module.lora_B["default"].weight))
        peft_model.save_pretrained(directory)
    return peft_modules(peft_model)


def short_name(full_name: str) -> tuple[int, str]:
    parts = full_name.split(".")  # model.layers.{i}.{self_attn|mlp}.{short}
    return int(parts[2]), parts[4]


def assert_matches_peft(adapter, expected: dict) -> None:
    assert {short_name(n) for n in expected} == set(adapter.modules)
    for name, (a, b, scale) in expected.items():
        ours = adapter.modules[short_name(name)]
        assert torch.equal(ours.lora_a, a), name
        assert torch.equal(ours.lora_b, b), name
        assert ours.scale == pytest.approx(scale, rel=1e-12), name
        assert ours.lora_a.is_contiguous() and ours.lora_b.is_contiguous()
    assert adapter.rank == max(a.shape[0] for a, _, _ in expected.values())
    assert adapter.target_modules == tuple(sorted({short_name(n)[1] for n in expected}))


# --- adapters peft makes come back exactly -------------------------------------------------

GOOD_CONFIGS = {
    "r8_q_v": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16_all_linear_rslora": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True),
    "rank_and_alpha_pattern": dict(
        r=8, lora_alpha=16, target_modules=list(LORA_TARGET_MODULES),
        rank_pattern={"model.layers.1.self_attn.q_proj": 4, "down_proj": 12},
        alpha_pattern={"layers.2.mlp.up_proj": 3, "v_proj": 24},
    ),
    "rank_pattern_with_rslora": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 6},
    ),
    "layers_to_transform_list": dict(
        r=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], layers_pattern="layers",
    ),
    "layers_to_transform_int": dict(r=8, target_modules=["gate_proj"], layers_to_transform=1),
    "regex_target": dict(r=8, lora_alpha=5, target_modules=r".*\.layers\.[12]\.(self_attn\.(k|o)_proj|mlp\.gate_proj)"),
    "exclude_modules": dict(
        r=8, target_modules=["q_proj", "up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"],
    ),
    "suffix_with_block": dict(r=2, target_modules=["self_attn.v_proj", "mlp.down_proj"]),
}


@pytest.mark.parametrize("name", GOOD_CONFIGS)
def test_loads_what_peft_saved(name, tmp_path, model_config):
    expected = save_peft_adapter(tmp_path, **GOOD_CONFIGS[name])
    assert expected, "peft adapted nothing: the test config is wrong"
    adapter = load_peft_adapter_dir(tmp_path, model_config, max_rank=MAX_RANK)
    assert_matches_peft(adapter, expected)


def test_rank_pattern_varies_rank(tmp_path, model_config):
    save_peft_adapter(tmp_path, **GOOD_CONFIGS["rank_and_alpha_pattern"])
    adapter = load_peft_adapter_dir(tmp_path, model_config, max_rank=MAX_RANK)
    assert adapter.modules[(1, "q_proj")].rank == 4
    assert adapter.modules[(0, "q_proj")].rank == 8
    assert adapter.modules[(2, "down_proj")].rank == 12
    assert adapter.modules[(2, "up_proj")].scale == 3 / 8
    assert adapter.rank == 12 and adapter.alpha == 16 and not adapter.use_rslora


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_base_module_names_are_what_transformers_builds(architecture):
    """The names peft matches targets against, for each architecture the server runs."""
    from server.lora.peft import _base_module_names

    model_type = architecture.removesuffix("ForCausalLM").lower()
    hf_config = transformers.AutoConfig.for_model(model_type, architectures=[architecture], **SHAPE)
    model = getattr(transformers, architecture)(hf_config)
    expected = [name for name, _ in model.named_modules()]
    assert _base_module_names(ModelConfig.from_hf_dict(hf_config.to_dict())) == expected


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """A good r=8 q/v adapter: its config, its tensors, and peft's modules."""
    directory = tmp_path_factory.mktemp("good")
    expected = save_peft_adapter(directory, **GOOD_CONFIGS["r8_q_v"])
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_safetensors((directory / "adapter_model.safetensors").read_bytes())
    return config, tensors, expected


def load(config: dict, tensors: dict | bytes, model_config, **kwargs):
    weights = tensors if isinstance(tensors, bytes) else save_safetensors(tensors)
    kwargs.setdefault("max_rank", MAX_RANK)
    return load_peft_adapter(config, weights, model_config, **kwargs)


def test_config_and_weights_as_bytes_str_dict_or_path(good_files, model_config, tmp_path):
    config, tensors, expected = good_files
    weights = save_safetensors(tensors)
    (tmp_path / "c.json").write_text(json.dumps(config))
    (tmp_path / "w.safetensors").write_bytes(weights)
    for cfg, w in [(config, weights), (json.dumps(config), weights), (json.dumps(config).encode(), weights),
                   (tmp_path / "c.json", tmp_path / "w.safetensors")]:
        assert_matches_peft(load_peft_adapter(cfg, w, model_config, max_rank=MAX_RANK), expected)


def test_casts_to_dtype_and_accepts_half_precision_files(good_files, model_config):
    config, tensors, expected = good_files
    half = {k: v.to(torch.float16) for k, v in tensors.items()}
    adapter = load(config, half, model_config, dtype=torch.bfloat16)
    for name, (a, b, _) in expected.items():
        module = adapter.modules[short_name(name)]
        assert module.lora_a.dtype == torch.bfloat16 and module.lora_b.dtype == torch.bfloat16
        torch.testing.assert_close(module.lora_a.float(), a, rtol=1e-2, atol=1e-2)


def test_all_linear_literal_and_fan_in_fan_out_load_as_peft_loads_them(good_files, model_config, tmp_path):
    """peft saves all-linear expanded and fan_in_fan_out forced off; a hand-edited config with the
    literal values must still mean what peft's own loader makes of it."""
    config, _, _ = good_files
    save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES))
    edited = {**config, "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "fan_in_fan_out": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(edited))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_modules(PeftModel.from_pretrained(fresh_base(), tmp_path))
    assert len(expected) == 3 * len(LORA_TARGET_MODULES)
    assert_matches_peft(load_peft_adapter_dir(tmp_path, model_config, max_rank=MAX_RANK), expected)


def test_harmless_fields_are_accepted(good_files, model_config):
    config, tensors, expected = good_files
    edited = {**config, "lora_dropout": 0.3, "task_type": "CAUSAL_LM", "init_lora_weights": "gaussian",
              "base_model_name_or_path": "x/y", "revision": "main", "inference_mode": False,
              "some_future_field": None, "eva_config": {"rho": 2.0}, "use_dora": False, "modules_to_save": [],
              "target_modules": None}  # null means peft's llama default, q_proj and v_proj
    assert_matches_peft(load(edited, tensors, model_config), expected)


def test_parse_adapter_config_fills_peft_defaults():
    cfg = parse_adapter_config(b'{"peft_type": "LORA"}')
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {} and cfg["bias"] == "none"


# --- refusals ----------------------------------------------------------------------------


def assert_refused(excinfo, field: str, *words: str) -> None:
    err = excinfo.value
    assert err.field == field, str(err)
    assert field in str(err) or field in ("adapter_model", "adapter_config"), str(err)
    for word in words:
        assert word.lower() in str(err).lower(), str(err)


CONFIG_REFUSALS = [
    ("peft_type", "ADALORA", "peft_type", ()),
    ("bias", "all", "bias", ()),
    ("bias", "lora_only", "bias", ()),
    ("modules_to_save", ["lm_head"], "modules_to_save", ()),
    ("use_dora", "yes", "use_dora", ()),
    ("lora_bias", True, "lora_bias", ()),
    ("layer_replication", [[0, 2], [1, 3]], "layer_replication", ()),
    ("trainable_token_indices", [1, 2], "trainable_token_indices", ()),
    ("target_parameters", ["mlp.gate_up_proj"], "target_parameters", ()),
    ("use_qalora", True, "use_qalora", ()),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens", ()),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config", ()),
    ("kasa_config", {"beta": 1.0}, "kasa_config", ()),
    ("use_bdlora", {"nblocks": 2}, "use_bdlora", ()),
    ("init_lora_weights", "pissa", "init_lora_weights", ("base",)),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights", ()),
    ("init_lora_weights", "olora", "init_lora_weights", ()),
    ("init_lora_weights", "made_up", "init_lora_weights", ()),
    ("some_new_feature", True, "some_new_feature", ("unknown",)),
    ("r", 0, "r", ()),
    ("r", 2.5, "r", ()),
    ("r", True, "r", ()),
    ("lora_alpha", "16", "lora_alpha", ()),
    ("lora_alpha", float("nan"), "lora_alpha", ()),
    ("use_rslora", "yes", "use_rslora", ()),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern", ()),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern", ()),
    ("target_modules", 5, "target_modules", ()),
    ("target_modules", "model.(", "target_modules", ()),
    ("layers_to_transform", "0", "layers_to_transform", ()),
]


@pytest.mark.parametrize("field,value,expected_field,words", CONFIG_REFUSALS,
                         ids=[f"{f}={v!r}" for f, v, _, _ in CONFIG_REFUSALS])
def test_refuses_config(field, value, expected_field, words, good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, field: value}, tensors, model_config)
    assert_refused(excinfo, expected_field, *words)


@pytest.mark.parametrize("targets,words", [
    (["embed_tokens"], ("model.embed_tokens", "not supported")),
    (["lm_head"], ("lm_head", "not supported")),
    (["q_proj", "mlp"], ("model.layers.0.mlp",)),
    (["q_proj", "qkv_proj"], ("qkv_proj", "matches no module")),
    (r"model\.layers\.0\.self_attn", ("model.layers.0.self_attn", "not supported")),
    (r".*\.nothing", ("targets no module",)),
    ([], ("targets no module",)),
])
def test_refuses_targets_missing_or_unsupported(targets, words, good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "target_modules": targets}, tensors, model_config)
    assert_refused(excinfo, "target_modules", *words)


def test_refuses_when_layer_filters_leave_nothing(good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "layers_to_transform": [7]}, tensors, model_config)
    assert_refused(excinfo, "target_modules", "targets no module")


def test_refuses_layers_with_regex_target(good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "target_modules": ".*q_proj", "layers_to_transform": [0]}, tensors, model_config)
    assert_refused(excinfo, "layers_to_transform")


def test_refuses_rank_above_max_rank(good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load(config, tensors, model_config, max_rank=4)
    assert_refused(excinfo, "r", "max_rank")
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "rank_pattern": {"q_proj": 16}}, tensors, model_config, max_rank=8)
    assert_refused(excinfo, "rank_pattern", "max_rank")


def test_refuses_rank_that_disagrees_with_rank_pattern(good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "rank_pattern": {"model.layers.1.self_attn.q_proj": 4}}, tensors, model_config)
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"
    assert_refused(excinfo, key, "rank_pattern", "r=4")


Q0_A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


def edited_tensors(tensors: dict, key: str, value: torch.Tensor | None) -> dict:
    out = dict(tensors)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("key,make,words", [
    (Q0_A, lambda t: torch.randn(8, 65), ("does not fit",)),
    (Q0_B, lambda t: torch.randn(63, 8), ("does not fit",)),
    (Q0_A, lambda t: torch.randn(4, 64), ("rank 4",)),
    (Q0_A, lambda t: torch.randn(8, 64, 1), ("shape",)),
    (Q0_A, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")), ("nan",)),
    (Q0_B, lambda t: t.index_fill(0, torch.tensor([5]), float("inf")), ("inf",)),
    (Q0_A, lambda t: torch.randint(0, 3, t.shape, dtype=torch.int32), ("dtype",)),
    (Q0_A, lambda t: None, ("missing",)),  # B without A
    (Q0_B, lambda t: None, ("missing",)),  # A without B
    (f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight", lambda t: torch.randn(8, 64), ("unexpected",)),
    (f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight", lambda t: torch.randn(8, 64), ("unexpected",)),
    (f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector", lambda t: torch.randn(64), ("unexpected",)),
    ("base_model.model.lm_head.lora_A.weight", lambda t: torch.randn(8, 64), ("unexpected",)),
], ids=["A_in_features", "B_out_features", "A_rank", "A_3d", "nan", "inf", "int_dtype", "B_without_A",
        "A_without_B", "untargeted_module", "layer_out_of_range", "dora_key", "lm_head_key"])
def test_refuses_tensor(key, make, words, good_files, model_config):
    config, tensors, _ = good_files
    bad = edited_tensors(tensors, key, make(tensors.get(key, torch.empty(0))))
    with pytest.raises(AdapterValidationError) as excinfo:
        load(config, bad, model_config)
    assert_refused(excinfo, key, *words)


def test_refuses_weights_over_max_bytes(good_files, model_config):
    config, tensors, _ = good_files
    weights = save_safetensors(tensors)
    with pytest.raises(AdapterValidationError) as excinfo:
        load(config, weights, model_config, max_bytes=len(weights) - 1)
    assert_refused(excinfo, "adapter_model", str(len(weights)))
    load(config, weights, model_config, max_bytes=len(weights))


@pytest.mark.parametrize("mangle", [
    lambda w: w[: len(w) // 2],
    lambda w: w[:5],
    lambda w: b"",
    lambda w: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)),
    lambda w: (10**12).to_bytes(8, "little") + w[8:],
], ids=["truncated", "truncated_header", "empty", "garbage", "huge_header_length"])
def test_refuses_broken_safetensors(mangle, good_files, model_config):
    config, tensors, _ = good_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load(config, mangle(save_safetensors(tensors)), model_config)
    assert_refused(excinfo, "adapter_model", "safetensors")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100000])
def test_refuses_broken_config_json(raw):
    with pytest.raises(AdapterValidationError) as excinfo:
        parse_adapter_config(raw)
    assert_refused(excinfo, "adapter_config")


def test_refuses_pickle_only_directory(good_files, model_config, tmp_path):
    config, tensors, _ = good_files
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterValidationError) as excinfo:
        load_peft_adapter_dir(tmp_path, model_config, max_rank=MAX_RANK)
    assert_refused(excinfo, "adapter_model", "adapter_model.bin", "pickle")


def test_refuses_directory_without_config(tmp_path, model_config):
    with pytest.raises(AdapterValidationError) as excinfo:
        load_peft_adapter_dir(tmp_path, model_config, max_rank=MAX_RANK)
    assert_refused(excinfo, "adapter_config")


def test_scale_is_alpha_over_sqrt_r_with_rslora(good_files, model_config):
    config, tensors, _ = good_files
    adapter = load({**config, "use_rslora": True, "lora_alpha": 12}, tensors, model_config)
    assert all(m.scale == pytest.approx(12 / math.sqrt(8)) for m in adapter.modules.values())


# --- DoRA ------------------------------------------------------------------------------------

Q0_M = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"


@pytest.fixture(scope="module")
def dora_files(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh_base(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], use_dora=True))
        peft_model.save_pretrained(directory)
    magnitudes = {name.removeprefix(PREFIX): module.lora_magnitude_vector["default"].weight.detach().clone()
                  for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    return json.loads((directory / "adapter_config.json").read_text()), load_safetensors((directory / "adapter_model.safetensors").read_bytes()), magnitudes


def test_dora_magnitudes_load_as_peft_holds_them(dora_files, model_config):
    config, tensors, magnitudes = dora_files
    adapter = load(config, tensors, model_config)
    assert adapter.use_dora and len(magnitudes) == 2 * SHAPE["num_hidden_layers"]
    for name, m in magnitudes.items():
        assert torch.equal(adapter.modules[short_name(name)].magnitude, m), name


@pytest.mark.parametrize("key,make,words", [
    (Q0_M, lambda t: torch.randn(63), ("shape", "(64,)")),
    (Q0_M, lambda t: torch.randn(64, 1), ("shape",)),
    (Q0_M, lambda t: t.index_fill(0, torch.tensor([2]), float("nan")), ("nan",)),
    (Q0_M, lambda t: t.to(torch.int32), ("dtype",)),
    (Q0_M, lambda t: None, ("missing", "magnitude")),
], ids=["short", "2d", "nan", "int", "missing"])
def test_refuses_bad_dora_magnitude(key, make, words, dora_files, model_config):
    config, tensors, _ = dora_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load(config, edited_tensors(tensors, key, make(tensors[key])), model_config)
    assert_refused(excinfo, key, *words)


def test_refuses_dora_on_embeddings(dora_files, model_config):
    config, tensors, _ = dora_files
    with pytest.raises(AdapterValidationError) as excinfo:
        load({**config, "target_modules": ["q_proj", "embed_tokens"]}, tensors, model_config)
    assert_refused(excinfo, "target_modules", "embed_tokens", "DoRA")
