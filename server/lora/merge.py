"""Merge a PEFT LoRA (or DoRA) adapter into its base model: a plain checkpoint, served at base speed.

Each targeted projection's weight becomes what peft's `merge_and_unload()` leaves there:
LoRA `W + s B A`; DoRA `(m / ||W + s B A||_row) * (W + s B A)` (the factor per output row,
server/lora/dora.py); biases unchanged. The sum is formed in float32 and cast back to the
checkpoint's dtype once. Every other file of the checkpoint directory (config, tokenizer,
generation config) is copied as it is, so `loraplex serve --model OUT` serves the result
with no adapter. The directory is written under a temporary name beside OUT and renamed into
place when complete; OUT must not exist yet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from server.lora.adapter import LoRAAdapter
from server.lora.dora import factor_of_merged, merged_weight
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter_dir, module_name
from server.model.config import ModelConfig
from server.model.loader import checkpoint_files
from server.model.prepare import sha256_file

PROVENANCE_FILE = "loraplex-merge.json"
_SKIPPED_FILES = {"loraplex-prepared.json"}  # loraplex's marker of a prepared model: not the merged one's
_MAX_MERGE_RANK = 1 << 16  # no serving limit applies to a merge; shapes are still checked


class MergeError(ValueError):
    """The merge cannot be done (the output exists, the adapter does not fit the model, ...)."""


def merged_weights(adapter: LoRAAdapter, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors `tensors` (HF names) with the adapter merged into those it targets;
    the others are returned unchanged. Only the tensors present are merged (a sharded checkpoint
    is merged file by file)."""
    out = dict(tensors)
    for (layer, short), m in adapter.modules.items():
        key = f"{module_name(layer, short)}.weight"
        if key not in tensors:
            continue
        weight = tensors[key]
        combined = merged_weight(weight, m.lora_a, m.lora_b, m.scale)
        if m.magnitude is not None:  # the factor's norm is of this same W + s B A
            combined *= factor_of_merged(combined, m.magnitude)[:, None]
        out[key] = combined.to(weight.dtype)
    return out


def merge_adapter_dir(adapter_dir: Path, model_dir: Path, out_dir: Path) -> Path:
    """Write `model_dir` with the adapter of `adapter_dir` merged in to `out_dir`; returns out_dir."""
    adapter_dir, model_dir, out_dir = Path(adapter_dir), Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise MergeError(f"{out_dir} already exists; give a new directory to write the merged checkpoint to")
    model = ModelConfig.from_dir(model_dir)
    adapter = load_peft_adapter_dir(adapter_dir, model, max_rank=_MAX_MERGE_RANK, dtype=torch.float32)
    files = checkpoint_files(model_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        merged = set()
        for file in files:
            tensors = load_file(file)
            result = merged_weights(adapter, tensors)
            merged.update(k for k in tensors if result[k] is not tensors[k])
            save_file(result, staging / file.name, metadata={"format": "pt"})
        expected = {f"{module_name(layer, short)}.weight" for layer, short in adapter.modules}
        if merged != expected:
            raise MergeError(f"the checkpoint lacks weights the adapter targets: {sorted(expected - merged)[:3]}")
        for entry in model_dir.iterdir():
            if entry.is_file() and entry.suffix != ".safetensors" and entry.name not in _SKIPPED_FILES:
                shutil.copy2(entry, staging / entry.name)
        provenance = {"base_model": str(model_dir.resolve()), "adapter": str(adapter_dir.resolve()),
                      "adapter_sha256": sha256_file(adapter_dir / WEIGHTS_FILE),
                      "adapter_config": json.loads((adapter_dir / CONFIG_FILE).read_text()),
                      "use_dora": adapter.use_dora}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
