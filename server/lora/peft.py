"""Parse and validate a PEFT LoRA adapter against the shape of the base model.

Input: what `peft` 0.21 `save_pretrained` writes for a Llama-family *ForCausalLM, i.e.
`adapter_config.json` + `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r). Output: a `LoRAAdapter`. Everything is checked here, at
upload, so a request never meets a broken adapter (STYLE habit 3). The rules follow peft's code:

- Modules adapted: peft's `check_target_module_exists` over the base model's `named_modules()`
  names. `target_modules` is a list (exact full name or dotted suffix), a regex (`re.fullmatch`
  on the full name), "all-linear" (every linear but `lm_head`) or null (peft's llama default:
  q_proj, v_proj); `exclude_modules`, `layers_to_transform`, `layers_pattern` narrow it.
- Per-module rank and alpha: `rank_pattern` / `alpha_pattern` via peft's `get_pattern_key`;
  scale = alpha / r, or alpha / sqrt(r) with `use_rslora`.
- Accepted, no effect on inference: `lora_dropout`, `fan_in_fan_out` (peft forces it False for
  nn.Linear; A and B keep their shapes), inits that leave the base weights alone, bookkeeping.
- DoRA (`use_dora: true`): every targeted module also needs its `lora_magnitude_vector`
  (out_features,), float and finite (server/lora/dora.py says how it is served).
- Refused with AdapterValidationError (`field` names the config field or tensor key): another
  `peft_type`; `bias` != "none"; features that change the forward or the model (other LoRA
  variants, lora_bias, modules_to_save, ...); inits that rewrite base weights (PiSSA, OLoRA,
  CorDA, LoftQ, LoRA-GA: convert to plain LoRA with peft first); unknown fields that are set;
  targets absent from the base model or other than its seven projections; r < 1 or > max_rank;
  tensors missing, unexpected, misshapen, not float or not finite; files over `max_bytes`,
  not safetensors, or a pickled `adapter_model.bin` (never unpickled).

Stricter than peft on purpose: peft only warns about missing/unexpected tensors and ignores
`target_modules` entries that match nothing; a server refuses them. Adapters for a bare
*Model (keys without the `model.` of *ForCausalLM) are refused as unexpected keys.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.model.config import LORA_TARGET_MODULES, ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# peft wraps the *ForCausalLM in a LoraModel whose `.model` is it; the adapter name is dropped on save.
_KEY_PREFIX = "base_model.model."
_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # under self_attn; the rest of
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")  # LORA_TARGET_MODULES live under mlp
_ALL_LINEAR = "all-linear"
# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING entry for llama, mistral and qwen2.
_DEFAULT_TARGETS = ("q_proj", "v_proj")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# LoraConfig defaults for the fields this parser interprets (peft fills them in the same way).
_DEFAULTS: dict[str, Any] = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
    "init_lora_weights": True, "use_dora": False, "target_modules": None, "exclude_modules": None,
    "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
}
# Fields that describe provenance or training only; whatever their value, inference is the same.
# ensure_weight_tying only ties modules_to_save/embedding adapters (refused); *_config only serve their init.
_BOOKKEEPING_FIELDS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
# Features that change the forward or the model; each must be unset (null, false or empty).
_REJECTED_WHEN_SET = {
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "lora_bias (a bias on lora_B) is not supported",
    "layer_replication": "layer_replication is not supported: it changes the base model's layer stack",
    "trainable_token_indices": "trainable_token_indices (embedding token updates) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "use_qalora": "QALoRA is not supported",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) is not supported",
    "megatron_config": "adapters for Megatron parallel layers are not supported",
    # VeLoRA and MonteCLoRA infer like plain LoRA but save extra state tensors; not supported yet.
    "velora_config": "the VeLoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "use_bdlora": "the block-diagonal LoRA variant is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "the KaSA variant is not supported",
}
# Initialisations whose adapter only makes sense on base weights they rewrote (prefix match, as peft).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Initialisations that leave the base weights alone (mica only freezes B while training).
_PLAIN_INIT_STRINGS = ("gaussian", "eva", "orthogonal", "mica")


class AdapterValidationError(ValueError):
    """The adapter cannot be served; `field` names the config field or tensor key at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _fail(field: str | None, message: str) -> AdapterValidationError:
    return AdapterValidationError(message, field)


def parse_adapter_config(raw: bytes | str | dict) -> dict:
    """Parse `adapter_config.json` and check what can be checked without the base model.

    Returns a copy with peft's defaults filled in and `target_modules` normalised
    (null -> peft's default list, list -> sorted unique list, string kept).
    """
    try:
        cfg = dict(raw) if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        raise _fail("adapter_config", f"adapter_config is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _fail("adapter_config", "adapter_config must be a JSON object")

    if cfg.get("peft_type") != "LORA":
        raise _fail("peft_type", f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for name, value in cfg.items():
        if name in _REJECTED_WHEN_SET and value:
            raise _fail(name, f"{name}={value!r}: {_REJECTED_WHEN_SET[name]}")
        if value and name not in {"peft_type", *_DEFAULTS, *_BOOKKEEPING_FIELDS, *_REJECTED_WHEN_SET}:
            raise _fail(name, f"unknown adapter_config field {name!r} is set ({value!r}); refusing to ignore it")
    for name, default in _DEFAULTS.items():
        if name not in cfg or (cfg[name] is None and isinstance(default, dict)):  # null patterns mean none
            cfg[name] = dict(default) if isinstance(default, dict) else default

    if cfg["bias"] != "none":
        raise _fail("bias", f"bias must be 'none', got {cfg['bias']!r}")
    _check_rank("r", cfg["r"])
    _check_alpha("lora_alpha", cfg["lora_alpha"])
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(cfg[name], bool):
            raise _fail(name, f"{name} must be true or false, got {cfg[name]!r}")
    _check_init(cfg["init_lora_weights"])
    for field_name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = cfg[field_name]
        if not isinstance(patterns, dict):
            raise _fail(field_name, f"{field_name} must be an object, got {patterns!r}")
        for key, value in patterns.items():
            _check_regex(field_name, rf"(.*\.)?({key})$")
            check(field_name, value)

    cfg["target_modules"] = _normalise_names("target_modules", cfg["target_modules"], _DEFAULT_TARGETS)
    cfg["exclude_modules"] = _normalise_names("exclude_modules", cfg["exclude_modules"], ())
    _check_layers(cfg)
    return cfg


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module as the config and the tensor header describe it (no values read)."""

    layer: int
    module: str  # short name, e.g. "q_proj"
    rank: int
    scale: float
    a_key: str  # its lora_A tensor: (rank, in_features)
    b_key: str  # its lora_B tensor: (out_features, rank)
    m_key: str | None = None  # DoRA: its lora_magnitude_vector (out_features,)


def check_adapter_tensors(
    cfg: dict, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], model: ModelConfig, *, max_rank: int,
    allowed_modules: frozenset[str] | None = None,
) -> list[ModuleSpec]:
    """Every check of `load_peft_adapter` that needs no tensor values, on a parsed config and each
    tensor's (dtype, shape): targets (within `allowed_modules`, the modules this server's adapter
    pool holds; None: any), ranks, missing or unexpected keys, dtypes and shapes."""
    targets = _targeted_linears(cfg, model)
    if allowed_modules is not None:
        outside = sorted({short for _, short in targets.values()} - allowed_modules)
        if outside:
            raise _fail("target_modules", f"the adapter targets {', '.join(outside)}, which this server does not "
                        f"serve adapters on (LORAPLEX_LORA_MODULES: {', '.join(sorted(allowed_modules))})")
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if cfg["use_dora"] else ())
    key_names = {name: tuple(f"{_KEY_PREFIX}{name}.{suffix}" for suffix in suffixes) for name in targets}
    expected_keys = {key for keys in key_names.values() for key in keys}
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        what = "lora_A/lora_B weight or DoRA magnitude" if cfg["use_dora"] else "lora_A/lora_B weight"
        dora_hint = " (a lora_magnitude_vector needs use_dora: true)" if any(
            k.endswith(".lora_magnitude_vector") for k in unexpected) and not cfg["use_dora"] else ""
        raise _fail(unexpected[0], f"unexpected tensor {unexpected[0]!r}: not the {what} of a "
                    f"module this config targets in the base model ({len(unexpected)} such key(s)){dora_hint}")

    shapes = model.linear_shapes()
    specs = []
    for name, (layer, short) in targets.items():
        r, r_field = _pattern_value(cfg, "rank_pattern", "r", name)
        alpha, _ = _pattern_value(cfg, "alpha_pattern", "lora_alpha", name)
        if r > max_rank:
            raise _fail(r_field, f"rank {r} of {name} ({r_field}) exceeds this server's max_rank {max_rank}")
        a_key, b_key, *m_key = key_names[name]
        for key in key_names[name]:
            if key not in tensors:
                needs = "lora_A, lora_B and (DoRA) lora_magnitude_vector" if m_key else "both lora_A and lora_B"
                raise _fail(key, f"tensor {key!r} is missing: every targeted module needs {needs}")
        in_features, out_features = shapes[short]
        _check_tensor(a_key, *tensors[a_key], (r, in_features), rank_dim=0, r_field=r_field)
        _check_tensor(b_key, *tensors[b_key], (out_features, r), rank_dim=1, r_field=r_field)
        if m_key:
            _check_magnitude(m_key[0], *tensors[m_key[0]], out_features)
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r  # as peft's LoraLayer.update_layer
        specs.append(ModuleSpec(layer, short, r, scale, a_key, b_key, m_key[0] if m_key else None))
    return specs


CONFIG_BYTES_ALLOWANCE = 1 << 20  # adapter_config.json (peft writes about 1 KB) and multipart framing
HEADER_BYTES_PER_TENSOR = 512  # safetensors header: key, dtype, shape, offsets (about 130 bytes each)


def max_adapter_upload_bytes(model: ModelConfig, max_rank: int) -> int:
    """The largest upload a valid adapter for this base model can be: every targetable linear of
    every layer at `max_rank` in float64 (the widest dtype accepted), its safetensors header and
    the config. Anything larger is refused before it is read (the server's limit is the smaller
    of this and LORAPLEX_MAX_UPLOAD_BYTES)."""
    shapes = model.linear_shapes()
    elements = max_rank * sum(fan_in + fan_out for fan_in, fan_out in shapes.values()) * model.num_layers
    tensors = 2 * len(shapes) * model.num_layers
    return elements * 8 + tensors * HEADER_BYTES_PER_TENSOR + (64 << 10) + CONFIG_BYTES_ALLOWANCE


def load_peft_adapter(
    config: bytes | str | dict | Path, weights: bytes | Path, model: ModelConfig, *,
    max_rank: int, dtype: torch.dtype = torch.float32, max_bytes: int | None = None,
    allowed_modules: frozenset[str] | None = None,
) -> LoRAAdapter:
    """Validate a PEFT LoRA adapter against `model` (and the modules this server serves adapters
    on: `allowed_modules`, None = any) and return it with tensors cast to `dtype`."""
    if isinstance(config, os.PathLike):
        config = Path(config).read_bytes()
    cfg = parse_adapter_config(config)
    tensors = _read_weights(weights, max_bytes)
    specs = check_adapter_tensors(cfg, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, model,
                                  max_rank=max_rank, allowed_modules=allowed_modules)
    modules: dict[tuple[int, str], LoRAModuleWeights] = {}
    for spec in specs:
        for key in (spec.a_key, spec.b_key, spec.m_key):
            if key is not None and not torch.isfinite(tensors[key]).all():
                raise _fail(key, f"tensor {key!r} contains NaN or Inf values")
        lora_a, lora_b = (tensors[key].to(dtype).contiguous() for key in (spec.a_key, spec.b_key))
        magnitude = None if spec.m_key is None else tensors[spec.m_key].to(torch.float32).contiguous()
        modules[(spec.layer, spec.module)] = LoRAModuleWeights(lora_a, lora_b, spec.scale, magnitude)
    return adapter_from_config(cfg, modules)


def adapter_from_config(cfg: dict, modules: dict[tuple[int, str], LoRAModuleWeights], **packed) -> LoRAAdapter:
    """The LoRAAdapter of a parsed config and its modules (`packed`: buffer and layout, when packed)."""
    return LoRAAdapter(rank=max(m.rank for m in modules.values()), alpha=cfg["lora_alpha"],
                       use_rslora=cfg["use_rslora"], target_modules=tuple(sorted({s for _, s in modules})),
                       modules=modules, use_dora=cfg["use_dora"], **packed)


def load_peft_adapter_dir(
    path: Path, model: ModelConfig, *, max_rank: int, dtype: torch.dtype = torch.float32, max_bytes: int | None = None
) -> LoRAAdapter:
    """Load `adapter_config.json` + `adapter_model.safetensors` from a directory; never a pickle."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise _fail("adapter_config", f"{path / CONFIG_FILE} does not exist")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_WEIGHTS_FILE).exists():
            raise _fail("adapter_model", f"{path} holds only {PICKLE_WEIGHTS_FILE}, a pickle, which is never "
                        "loaded; re-save the adapter with save_pretrained(safe_serialization=True)")
        raise _fail("adapter_model", f"{path / WEIGHTS_FILE} does not exist")
    return load_peft_adapter(path / CONFIG_FILE, path / WEIGHTS_FILE, model,
                             max_rank=max_rank, dtype=dtype, max_bytes=max_bytes)


# --- config field checks
def _check_rank(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(field, f"{field}: rank must be an integer >= 1, got {value!r}")


def _check_alpha(field: str, value: Any) -> None:
    # JSON allows NaN and Infinity; a non-finite alpha would poison every output.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, f"{field}: alpha must be a finite number, got {value!r}")


def _check_init(value: Any) -> None:
    if isinstance(value, bool) or value in _PLAIN_INIT_STRINGS:
        return
    if isinstance(value, str) and value.lower().startswith(_BASE_REWRITING_INITS):
        raise _fail("init_lora_weights", f"init_lora_weights={value!r} rewrites the base model's weights, so the "
                    "adapter cannot share a base model; convert it to plain LoRA with peft's "
                    "save_pretrained(path_initial_model_for_weight_conversion=...)")
    raise _fail("init_lora_weights", f"unknown init_lora_weights {value!r}")


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise _fail(field, f"{field}: {pattern!r} is not a valid regular expression ({e})") from None


def _normalise_names(field: str, value: Any, default: tuple[str, ...]) -> str | list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        if value.lower() != _ALL_LINEAR:
            _check_regex(field, value)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    raise _fail(field, f"{field} must be a list of module names or a regex string, got {value!r}")


def _check_layers(cfg: dict) -> None:
    layers, pattern = cfg["layers_to_transform"], cfg["layers_pattern"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (layers is None or is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
        raise _fail("layers_to_transform", f"layers_to_transform must be an int or a list of ints, got {layers!r}")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not (patterns is None or (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns))):
        raise _fail("layers_pattern", f"layers_pattern must be a string or a list of strings, got {pattern!r}")
    for p in patterns or ():
        _check_regex("layers_pattern", p)
    # The same three refusals as LoraConfig.__post_init__.
    if isinstance(cfg["target_modules"], str) and layers is not None:
        raise _fail("layers_to_transform", "layers_to_transform cannot be used when target_modules is a string")
    if isinstance(cfg["target_modules"], str) and pattern is not None:
        raise _fail("layers_pattern", "layers_pattern cannot be used when target_modules is a string")
    if pattern and layers is None:
        raise _fail("layers_pattern", "layers_pattern is set but layers_to_transform is not")


# --- matching modules as peft does
def module_name(layer: int, short: str) -> str:
    """The full module name of a projection in a *ForCausalLM, e.g. model.layers.0.self_attn.q_proj."""
    block = "self_attn" if short in _ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{short}"


def _base_module_names(model: ModelConfig) -> list[str]:
    """What `named_modules()` yields for a Llama/Mistral/Qwen2 *ForCausalLM: the names peft matches."""
    names = ["", "model", "model.embed_tokens", "model.layers"]
    for i in range(model.num_layers):
        block = f"model.layers.{i}"
        names += [block, f"{block}.self_attn"] + [module_name(i, s) for s in _ATTENTION_MODULES]
        names += [f"{block}.mlp"] + [module_name(i, s) for s in _MLP_MODULES]
        names += [f"{block}.mlp.act_fn", f"{block}.input_layernorm", f"{block}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


def _targeted_linears(cfg: dict, model: ModelConfig) -> dict[str, tuple[int, str]]:
    """Full module name -> (layer index, short name) for every module peft would adapt."""
    linears = {module_name(i, s): (i, s) for i in range(model.num_layers) for s in LORA_TARGET_MODULES}
    names = _base_module_names(model)[1:]  # peft skips the root module
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        targets = set(linears)  # every nn.Linear except the output head, as peft expands it
    elif isinstance(targets, list):
        for entry in targets:
            if not any(n == entry or n.endswith(f".{entry}") for n in names):
                raise _fail("target_modules", f"target_modules entry {entry!r} matches no module of the base model")
        targets = set(targets)

    matched = {name: linears.get(name) for name in names if _is_targeted(cfg, targets, name)}
    unsupported = [name for name, linear in matched.items() if linear is None]
    if unsupported:
        dora = " (DoRA on embeddings or other layers is not supported either)" if cfg["use_dora"] else ""
        raise _fail("target_modules", f"target_modules selects {unsupported[0]!r}, which is not supported: only "
                    f"{', '.join(LORA_TARGET_MODULES)} can carry a LoRA adapter here{dora}")
    if not matched:
        raise _fail("target_modules", "the config targets no module of the base model (check target_modules, "
                    "exclude_modules, layers_to_transform and layers_pattern)")
    return matched


def _is_targeted(cfg: dict, targets: str | set[str], name: str) -> bool:
    """peft's tuners_utils.check_target_module_exists (modules_to_save is refused earlier)."""
    exclude = cfg["exclude_modules"]
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return False
    elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # an exact full name is taken whatever layers_to_transform says, as in peft
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg["layers_to_transform"]
    if layers is None or layers == []:
        return True
    index = _layer_index(name, cfg["layers_pattern"])
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_value(cfg: dict, pattern_field: str, default_field: str, name: str) -> tuple[Any, str]:
    """peft's rank_pattern/alpha_pattern lookup (utils.other.get_pattern_key): the first key that
    matches the end of the module name at a dot boundary wins. Returns the value and its field."""
    patterns = cfg[pattern_field]
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key], pattern_field
    return cfg[default_field], default_field


# --- tensors
def _read_weights(weights: bytes | Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    size = Path(weights).stat().st_size if isinstance(weights, os.PathLike) else len(weights)
    if max_bytes is not None and size > max_bytes:  # checked before reading a file into memory
        raise _fail("adapter_model", f"weights file is {size} bytes, over the {max_bytes} limit")
    if isinstance(weights, os.PathLike):
        weights = Path(weights).read_bytes()
    duplicate = _duplicate_header_key(weights)
    if duplicate is not None:  # safetensors would keep the last one: readers could disagree on the file
        raise _fail("adapter_model", f"adapter_model's safetensors header names tensor {duplicate!r} twice")
    try:
        # safetensors checks header length, JSON, dtypes and that the offsets tile the buffer.
        return load_safetensors(bytes(weights))
    except Exception as e:  # SafetensorError and friends: any malformed file is the uploader's error
        raise _fail("adapter_model", f"adapter_model is not a valid safetensors file: {e}") from None


class _Duplicate(Exception):
    pass


def _duplicate_header_key(weights: bytes) -> str | None:
    """A name the safetensors header gives twice, or None (also when the header does not parse:
    safetensors then says what is wrong)."""
    if len(weights) < 8:
        return None
    length = int.from_bytes(weights[:8], "little")
    if length > len(weights) - 8:
        return None

    def no_repeats(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
        return dict(pairs)

    try:
        json.loads(weights[8 : 8 + length], object_pairs_hook=no_repeats)
    except _Duplicate as e:
        return str(e.args[0])
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _check_tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...], expected: tuple[int, int], *,
                  rank_dim: int, r_field: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise _fail(key, f"tensor {key!r} has dtype {dtype}; expected float32, float16, bfloat16 or float64")
    feature_dim = 1 - rank_dim
    if len(shape) != 2 or shape[feature_dim] != expected[feature_dim]:
        raise _fail(key, f"tensor {key!r} has shape {tuple(shape)}, which does not fit the base model "
                    f"(expected {expected})")
    if shape[rank_dim] != expected[rank_dim]:
        raise _fail(key, f"tensor {key!r} has rank {shape[rank_dim]} but the config ({r_field}) gives "
                    f"r={expected[rank_dim]} for this module")


def _check_magnitude(key: str, dtype: torch.dtype, shape: tuple[int, ...], out_features: int) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise _fail(key, f"tensor {key!r} has dtype {dtype}; expected float32, float16, bfloat16 or float64")
    if tuple(shape) != (out_features,):
        raise _fail(key, f"DoRA magnitude {key!r} has shape {tuple(shape)}; expected ({out_features},), one value "
                    "per output feature of the module")
