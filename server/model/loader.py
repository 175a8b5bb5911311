"""Build our Llama model on the meta device and fill it from a safetensors checkpoint.

Hugging Face's separate q/k/v and gate/up weights are concatenated into our fused
projections as they are read; every expected tensor must be present and fit exactly.
With `quantize` ("nf4", "fp8"), each projection module is quantized on the device as it is read
(server/model/quantized.py) and the dense projection weights are never allocated. A checkpoint
that transformers saved with a bitsandbytes 4-bit NF4 config is read as it is, NF4 codes and
statistics unchanged (server/model/bnb_checkpoint.py), and so is an FP8 checkpoint in the
compressed-tensors or fbgemm_fp8 layout (server/model/fp8_checkpoint.py); any other quantized
checkpoint (`quantization_config` in its config.json) is refused with a clear error.

With `tp` (server/model/tensor_parallel.py) the model is one rank's shard, and each projection
tensor is read shard by shard (`ShardPlan.read`: safetensors slices of its rows or columns), so
no rank ever holds a whole projection; quantized weights are not sharded yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from server.model import bnb_checkpoint, fp8_checkpoint
from server.model.config import ModelConfig
from server.model.llama import LlamaModel
from server.model.quantized import QuantizationError, check_format, fuse, quantize_module
from server.model.tensor_parallel import TensorParallel

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF sub-module -> (our projection, index of the slice it fills)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class CheckpointError(ValueError):
    """The checkpoint's tensors do not fit the model its config describes."""


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            return sorted({path / name for name in json.load(f)["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    return files


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str, quantize: str | None = None,
               tp: TensorParallel | None = None) -> LlamaModel:
    """The model of a checkpoint directory; with `tp` (world size > 1), this rank's shard of it."""
    path = Path(path)
    quantize = check_format(quantize)
    saved = saved_format(path)
    if tp is not None and tp.world_size > 1:
        if saved:
            raise QuantizationError(f"{path} holds {saved.upper()} weights, which are not split over tensor-parallel "
                                    "ranks yet; serve its bf16 original with --quantize and --tensor-parallel-size")
        return _load(path, dtype, device, quantize, prequantized=False, tp=tp)  # each rank quantizes its shard
    if saved is not None:
        if quantize not in (None, saved):
            raise QuantizationError(f"{path} holds {saved.upper()} weights: --quantize {quantize} cannot "
                                    f"re-quantize them; serve it without --quantize (or with {saved})")
        return _load(path, dtype, device, saved, prequantized=True)
    return _load(path, dtype, device, quantize, prequantized=False)


def _load(path: Path, dtype: torch.dtype, device, quantize: str | None, prequantized: bool,
          tp: TensorParallel | None = None) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(ModelConfig.from_dir(path), tp).to(dtype)
    cfg = model.shard_config  # the shapes (and so the fused slices' offsets) this process holds
    plan = None if model.tp is None else model.tp.plan(model.config)
    projections = {f"layers.{i}.{'self_attn' if name in ('qkv_proj', 'o_proj') else 'mlp'}.{name}": proj
                   for i, name, proj in model.projections()}
    if quantize:
        for proj in projections.values():
            proj.weight = None  # never allocated: filled module by module with quantized weights
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}  # elements written per parameter
    pending: dict[str, dict[int, object]] = {}  # quantized projection -> its modules read so far, by row offset
    saved: dict[str, dict[str, torch.Tensor]] = {}  # a quantized checkpoint: HF module -> its tensors read so far
    reader = (bnb_checkpoint if quantize == "nf4" else fp8_checkpoint) if prequantized else None
    convert = bnb_checkpoint.to_nf4 if quantize == "nf4" else fp8_checkpoint.to_fp8

    def add_module(key: str, quantized_module) -> None:
        name, row_offset, _ = _target(key, cfg)
        module = name.removesuffix(".weight")
        proj = projections[module]
        parts = pending.setdefault(module, {})
        parts[row_offset] = quantized_module
        if len(parts) == len(proj.out_sizes):
            proj.quantized = fuse([parts[offset] for offset in sorted(parts)])
            del pending[module]

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                split = reader.split_key(key) if prequantized else None
                if split is not None:
                    hf_module, suffix = split
                    if suffix in reader.IGNORED:
                        continue
                    target = _target(f"{hf_module}.weight", cfg)
                    if target is None or target[0].removesuffix(".weight") not in projections:
                        raise CheckpointError(f"unexpected quantized tensor {key!r} in {file.name}")
                    saved.setdefault(hf_module, {})[suffix] = f.get_tensor(key)
                    if reader.complete(saved[hf_module]):
                        name, _, rows = target
                        proj = projections[name.removesuffix(".weight")]
                        shape = (rows or sum(proj.out_sizes), proj.in_features)
                        add_module(f"{hf_module}.weight", convert(hf_module, saved.pop(hf_module), shape, dtype, device))
                    continue
                target = _target(key, cfg)
                if target is None:
                    continue
                name, row_offset, rows = target
                module = name.removesuffix(".weight")
                if quantize and name.endswith(".weight") and module in projections:
                    proj = projections[module]
                    tensor = f.get_tensor(key) if plan is None else plan.read(f, key)
                    expected = (rows or sum(proj.out_sizes), proj.in_features)
                    if tuple(tensor.shape) != expected:
                        raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
                    add_module(key, quantize_module(tensor.to(device=device, dtype=dtype), quantize))
                    continue
                if name not in params:
                    raise CheckpointError(f"unexpected tensor {key!r} in {file.name}")
                tensor = f.get_tensor(key) if plan is None else plan.read(f, key)
                _copy_rows(params[name], tensor, row_offset, rows, key)
                filled[name] += tensor.numel()
    missing = [n for n, count in filled.items() if count != params[n].numel()]
    missing += [f"{m}.weight" for m, p in projections.items() if quantize and p.quantized is None]
    missing += [f"{m}.weight (some of its quantization tensors)" for m in saved]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:5])}")
    model.reset_rope()
    return model.eval()


def saved_format(path: Path) -> str | None:
    """"nf4" for a checkpoint transformers saved with a bitsandbytes 4-bit NF4 config, "fp8" for an FP8
    one in the compressed-tensors or fbgemm_fp8 layout, None for a plain one. Any other
    `quantization_config` (bitsandbytes 8-bit or FP4, AWQ, GPTQ, int compressed-tensors, ...) holds
    packed tensors and states our loader does not read: a clear error, not a shape mismatch.
    Quantize its bf16 original at load instead (--quantize nf4|fp8)."""
    try:
        with open(path / "config.json") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # ModelConfig.from_dir reports it
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    try:
        if isinstance(quant, dict) and bnb_checkpoint.is_bnb_4bit(quant):
            return "nf4"
        if isinstance(quant, dict) and fp8_checkpoint.is_fp8(quant):
            return "fp8"
    except (bnb_checkpoint.BnbCheckpointError, fp8_checkpoint.FP8CheckpointError) as exc:
        raise QuantizationError(f"{path}: {exc}") from None
    if quant:
        raise QuantizationError(
            f"{path} is a quantized checkpoint (quantization_config with quant_method {method!r}), which loraplex "
            "cannot read: serve its bf16 original with --quantize nf4 or --quantize fp8 (quantized as it loads)")


def _target(key: str, cfg: ModelConfig) -> tuple[str, int, int | None] | None:
    """Our parameter name, and the row offset and row count where an HF tensor goes
    (rows None: the whole parameter); None for tensors we do not use."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key == "lm_head.weight":
        return None if cfg.tie_word_embeddings else ("lm_head", 0, None)
    m = _LAYER_KEY.fullmatch(key)
    if not m:
        return (key.removeprefix("model."), 0, None)
    layer, rest = m.groups()
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        fused, slice_idx = _FUSED[module]
        sizes = _slice_sizes(fused, cfg)
        return f"layers.{layer}.{fused}.{kind}", sum(sizes[:slice_idx]), sizes[slice_idx]
    return f"layers.{layer}.{rest}", 0, None


def _slice_sizes(fused: str, cfg: ModelConfig) -> tuple[int, ...]:
    if fused.endswith("qkv_proj"):
        return (cfg.q_size, cfg.kv_size, cfg.kv_size)
    return (cfg.intermediate_size, cfg.intermediate_size)


def _copy_rows(param: torch.nn.Parameter, tensor: torch.Tensor, row_offset: int, rows: int | None, key: str) -> None:
    rows = param.shape[0] if rows is None else rows
    expected = (rows, *param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
    with torch.no_grad():
        param.data[row_offset : row_offset + rows].copy_(tensor)
